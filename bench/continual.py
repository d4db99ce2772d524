"""Continual-learning benchmark (issue 5): methods on two task streams, federated, with and without DP.

    /tmp/venv214/bin/python -m bench.continual [--quick]

Two streams of three tasks, each written as a JSONL train file and a JSONL
test file under a temporary folder (so continual runs and the joint run see
exactly the same test records):

- drug reviews, class-incremental: six conditions of the drug-review demo in
  three pairs; each record carries a synthetic ``group`` column, "2001",
  "2002" or "2003", that encodes its condition pair, and ``data.task_period =
  year`` makes each pair one task (written before ``data.task_groups``, which
  now cuts such a stream directly; the tasks are the same).
- headlines, domain-incremental by month: three months of the headlines demo.
  That demo is an instruction task and continual runs report accuracies, so a
  binary label is derived from the words of each headline: "covid" when it
  names the pandemic (``COVID_WORDS``), else "other". The months differ in
  how often and in which words the pandemic appears.

Every run is a real federation (ServerApp, ClientApp, strategy) driven
in-process by `tests.inprocess.InProcessGrid` (no Ray), with its own
``run.out_dir`` and ``run.state_dir`` in the temporary folder. Methods:
naive, replay, EWC, replay+EWC (also with federated importance), Avalanche's
LwF, and joint training on all tasks at once with the same total rounds, whose
final adapter is evaluated on every task's test split. Under DP
(``privacy.target_epsilon = 8``): naive, replay+EWC and joint (Avalanche
strategies are refused under DP). The two streams run side by side, each in its
own process with one torch thread (`--stream`). Writes bench/results/continual.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RESULT = "continual.json"

# The tiny random-init model learns weakly; lr 1e-2 is where it learns at all.
COMMON = ["model.name=tiny-llama", "model.threads=1", "federation.clients=3", "train.lr=1e-2",
          "train.local_steps=6", "train.batch_size=8", "continual.rounds_per_task=2",
          "strategy.transport=float32"]  # exact updates: no quantisation in the comparison
# 12 replayed records per client: half a client's share of the first drug task, a quarter
# of a headline month's; a memory, not the whole past.
METHOD_SETTINGS = ["continual.replay_capacity=12", "continual.ewc_strength=1000"]
DP = ["privacy.target_epsilon=8", "privacy.delta=1e-5"]

# Six frequent conditions of the demo in pairs ("Bipolar Disorde" is the source's spelling).
DRUG_GROUPS = [("Birth Control", "Depression"), ("Pain", "Acne"), ("Bipolar Disorde", "Insomnia")]
DRUG_CAP = 60  # records per condition: Birth Control alone would be half of every task otherwise
HEADLINE_MONTHS = ("2020-02", "2020-03", "2020-04")
HEADLINE_CAP = 200  # records per month
COVID_WORDS = re.compile(r"covid|coronavirus|virus|pandemic|lockdown|furlough|quarantine", re.IGNORECASE)
TEST_SHARE = 0.3

METHODS = {  # name -> overrides (all continual runs add METHOD_SETTINGS)
    "naive": ["continual.strategy=naive"],
    "replay": ["continual.strategy=replay"],
    "ewc": ["continual.strategy=ewc"],
    "replay+ewc": ["continual.strategy=replay+ewc"],
    "replay+ewc, federated importance": ["continual.strategy=replay+ewc", "continual.federated_importance=true"],
    "avalanche:LwF": ["continual.strategy=avalanche:LwF"],
}
DP_METHODS = ("naive", "replay+ewc")


# -- the streams as files -------------------------------------------------------------

def _split_write(folder: Path, name: str, tasks: list[list[dict]], seed: int = 0) -> tuple[Path, Path]:
    """Per task and label, hold out TEST_SHARE as test records; write both JSONL files."""
    rng = random.Random(seed)
    train, test = [], []
    for rows in tasks:
        for label in sorted({r["label"] for r in rows}):
            same = [r for r in rows if r["label"] == label]
            rng.shuffle(same)
            cut = max(1, round(TEST_SHARE * len(same)))
            test += same[:cut]
            train += same[cut:]
    paths = folder / f"{name}-train.jsonl", folder / f"{name}-test.jsonl"
    for path, rows in zip(paths, (train, test)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def drug_stream(folder: Path) -> dict:
    from fedcl.config import DataConfig
    from fedcl.demo_data import load_demo

    train, test = load_demo(DataConfig(dataset="drugreview"))  # conditions are in meta here
    rng = random.Random(0)
    tasks = []
    for index, group in enumerate(DRUG_GROUPS):
        rows = []
        for condition in group:
            found = [r for r in train + test if r["meta"]["condition"] == condition]
            rng.shuffle(found)
            rows += [{"text": r["text"], "label": condition, "group": str(2001 + index)}
                     for r in found[:DRUG_CAP]]
        tasks.append(rows)
    train_path, test_path = _split_write(folder, "drugs", tasks)
    return {"name": "drug reviews by condition pair (class-incremental)",
            "task_names": [" + ".join(g) for g in DRUG_GROUPS],
            "data": ["data.dataset=", f"data.path={train_path}", f"data.test_path={test_path}", "data.task_column=group",
                     "data.task_period=year"]}


def headline_stream(folder: Path) -> dict:
    from fedcl.config import DataConfig
    from fedcl.demo_data import load_demo

    records, _ = load_demo(DataConfig(dataset="headlines", task="instruction"))
    rng = random.Random(0)
    tasks = []
    for month in HEADLINE_MONTHS:
        found = [r for r in records if r["meta"]["month"] == month]
        rng.shuffle(found)
        tasks.append([{"text": r["response"], "label": "covid" if COVID_WORDS.search(r["response"]) else "other",
                       "date": r["meta"]["date"]} for r in found[:HEADLINE_CAP]])
    train_path, test_path = _split_write(folder, "headlines", tasks)
    return {"name": "headlines by month, label: names the pandemic or not (domain-incremental)",
            "task_names": list(HEADLINE_MONTHS),
            "data": ["data.dataset=", f"data.path={train_path}", f"data.test_path={test_path}", "data.task_column=date",
                     "data.task_period=month"]}


# -- runs ------------------------------------------------------------------------------

def federate(overrides: list[str], folder: Path):
    """One federation through the real apps, in-process; (config, metrics.json)."""
    from client.app import app as client_app
    from fedcl.config import load_config
    from server.app import main as server_main
    from tests.inprocess import InProcessGrid, server_context

    config = load_config(None, overrides + [f"run.out_dir={folder / 'run'}", f"run.state_dir={folder / 'state'}"])
    flat = config.to_flat()
    grid = InProcessGrid(client_app, config.federation.clients, flat)
    start = time.perf_counter()
    server_main(grid, server_context(flat))
    seconds = time.perf_counter() - start
    errors = [r.error.reason for r in grid.replies if r.has_error()]
    if errors:
        raise RuntimeError(f"client errors in {folder.name}: {errors[:3]}")
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    return config, metrics, seconds


def _epsilon(metrics: dict) -> float | None:
    eps = [c["epsilon"] for r in metrics["rounds"] for c in r["clients"] if "epsilon" in c]
    return max(eps) if eps else None


def continual_run(stream: dict, method: str, dp: bool, folder: Path) -> dict:
    overrides = COMMON + stream["data"] + METHOD_SETTINGS + METHODS[method] + (DP if dp else [])
    _, metrics, seconds = federate(overrides, folder)
    section = metrics["continual"]
    keys = ("accuracy_matrix", "zero_shot", "average_accuracy", "forgetting", "bwt", "fwt")
    entry = {"method": method, "dp": dp, "seconds": seconds, "epsilon": _epsilon(metrics),
             **{k: section[k] for k in keys}}
    if "avalanche_metrics" in section:
        entry["avalanche_metrics"] = section["avalanche_metrics"]
    return entry


def joint_run(stream: dict, dp: bool, folder: Path) -> dict:
    """All tasks at once, same total rounds; the final adapter on every task's test split."""
    from fedcl.config import load_config
    from fedcl.continual_session import build_stream
    from fedcl.session import GlobalEvaluator
    from server.checkpoint import RunDir

    continual = load_config(None, COMMON + stream["data"])
    tasks = build_stream(continual.data, continual.train.seed)
    rounds = len(tasks) * continual.continual.rounds_per_task
    overrides = COMMON + stream["data"] + [f"federation.rounds={rounds}", "data.task_column="] + (DP if dp else [])
    config, metrics, seconds = federate(overrides, folder)
    evaluator = GlobalEvaluator(config)
    state = evaluator.load_saved(RunDir(folder / "run").adapter_dir(rounds))
    accuracies = [float(evaluator.evaluate_records(state, t.test_records)["accuracy"]) for t in tasks]
    return {"method": "joint", "dp": dp, "seconds": seconds, "epsilon": _epsilon(metrics), "rounds": rounds,
            "round_accuracy": [r["eval"]["accuracy"] for r in metrics["rounds"]],
            "task_accuracies": accuracies, "average_accuracy": sum(accuracies) / len(accuracies)}


def stream_facts(stream: dict) -> dict:
    """Task sizes and each task's majority-label share of its test split (a constant predictor's best)."""
    from fedcl.config import load_config
    from fedcl.continual_session import build_stream

    config = load_config(None, COMMON + stream["data"])
    tasks = build_stream(config.data, config.train.seed)
    majority = [Counter(r["label"] for r in t.test_records).most_common(1)[0][1] / len(t.test_records)
                for t in tasks]
    return {"train_records": [len(t.train_records) for t in tasks],
            "test_records": [len(t.test_records) for t in tasks], "test_majority_share": majority}


# -- rendering ---------------------------------------------------------------------------

GOAL_GAP = 0.05  # replay+ewc's average accuracy >= (1 - 5%) x joint's
GOAL_FORGETTING = 0.02  # 2 points
CLEAR_FORGETTING = 0.05  # what we call naive forgetting "clearly": 5 points


def goal(stream: dict, dp: bool) -> dict:
    runs = {r["method"]: r for r in stream["runs"] if r["dp"] == dp}
    best, joint, naive = runs["replay+ewc"], runs["joint"], runs["naive"]
    return {"within_5pct_of_joint": best["average_accuracy"] >= (1 - GOAL_GAP) * joint["average_accuracy"],
            "forgetting_under_2": best["forgetting"] < GOAL_FORGETTING,
            "naive_forgets_clearly": naive["forgetting"] >= CLEAR_FORGETTING}


def _f(x: float | None, points: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.1f}" if points else f"{x:.3f}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _stream_lines(s: dict) -> list[str]:
    facts, names = s["facts"], s["task_names"]
    lines = [f"### {s['name']}", "",
             "Tasks, in order: " + "; ".join(
                 f"{n} ({a} train / {b} test records, majority label {m:.2f} of test)"
                 for n, a, b, m in zip(names, facts["train_records"], facts["test_records"],
                                       facts["test_majority_share"])) + ".", "",
             "| method | DP | average accuracy | forgetting (points) | BWT (points) | FWT (points) "
             "| final accuracy per task | max epsilon | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in s["runs"]:
        final = r["accuracy_matrix"][-1] if "accuracy_matrix" in r else r["task_accuracies"]
        eps = f"{r['epsilon']:.2f}" if r.get("epsilon") is not None else "-"
        lines.append(f"| {r['method']}{' (upper bound)' if r['method'] == 'joint' else ''} | {_yes(r['dp'])} "
                     f"| {_f(r['average_accuracy'])} | {_f(r.get('forgetting'), True)} | {_f(r.get('bwt'), True)} "
                     f"| {_f(r.get('fwt'), True)} | {' / '.join(f'{a:.3f}' for a in final)} | {eps} "
                     f"| {r['seconds']:.0f} |")
    lines += ["", "Accuracy matrices R[k][j] (accuracy on task j after task k; row 0 is zero-shot):", ""]
    for r in s["runs"]:
        if "accuracy_matrix" not in r:
            continue
        rows = [r["zero_shot"]] + r["accuracy_matrix"]
        lines.append(f"- {r['method']}{', DP' if r['dp'] else ''}: "
                     + " | ".join(" ".join(f"{a:.2f}" for a in row) for row in rows))
    lines += ["", "| goal (replay+EWC against joint) | no DP | DP (epsilon 8) |", "|---|---|---|"]
    g = {dp: goal(s, dp) for dp in (False, True)}
    for key, text in (("within_5pct_of_joint", "average accuracy >= 95% of joint's"),
                      ("forgetting_under_2", "forgetting < 2 points"),
                      ("naive_forgets_clearly", "naive forgets clearly (>= 5 points)")):
        lines.append(f"| {text} | {_yes(g[False][key])} | {_yes(g[True][key])} |")
    return lines + [""]


def _final(run: dict) -> list[float]:
    return run["accuracy_matrix"][-1] if "accuracy_matrix" in run else run["task_accuracies"]


def observations(s: dict) -> list[str]:
    """What the figures of one stream say, worked out from them (so a re-run rewrites it)."""
    runs = {(r["method"], r["dp"]): r for r in s["runs"]}
    naive, best, joint = runs[("naive", False)], runs[("replay+ewc", False)], runs[("joint", False)]
    majority = s["facts"]["test_majority_share"]
    stuck = [f"{m}{' (DP)' if dp else ''}" for (m, dp), r in runs.items()
             if all(abs(a - b) < 1e-9 for a, b in zip(_final(r), majority))]
    out = [f"- Naive forgets {100 * naive['forgetting']:.1f} points "
           f"({'clearly' if naive['forgetting'] >= CLEAR_FORGETTING else 'not clearly'}); replay+EWC "
           f"{100 * best['forgetting']:.1f}. Replay+EWC's average accuracy is {best['average_accuracy']:.3f} "
           f"against joint's {joint['average_accuracy']:.3f} ({100 * (best['average_accuracy'] - joint['average_accuracy']):+.1f} points)."]
    last_naive, last_best = _final(naive)[-1], _final(best)[-1]
    if last_best < last_naive - CLEAR_FORGETTING:
        out.append(f"- Replay+EWC pays in plasticity: {last_best:.3f} on the last task, where naive reaches "
                   f"{last_naive:.3f}.")
    weak = [name for name, a, m in zip(s["task_names"], _final(joint), majority) if a < m]
    if weak:
        out.append(f"- Joint is a weak upper bound here: below the majority share on {', '.join(weak)}. "
                   "Matching it says little about a method.")
    if stuck:
        learned = all(a > m for a, m in zip(_final(joint), majority))
        out.append(f"- These runs end predicting each task's majority label (their final accuracies equal the "
                   f"majority shares): {', '.join(stuck)}. Where a method never learns the tasks, its low "
                   "forgetting says nothing about the method."
                   + (" Joint, with the same total rounds, does learn (above the majority share on every task)."
                      if learned else ""))
    return out


def render(result: dict) -> list[str]:
    sizes = [n for s in result["streams"] for n in s["facts"]["test_records"]]
    lines = [f"## Continual learning ({result['model']}, measured {result['when']})", "",
             f"Streams of three tasks, {result['clients']} clients holding IID shares of every task, "
             f"{result['rounds_per_task']} rounds per task, {result['local_steps']} local steps of batch "
             f"{result['batch_size']} per round at lr {result['lr']:g}; replay keeps {result['replay_capacity']} "
             f"records per client, EWC strength {result['ewc_strength']:g} (not tuned). Joint trains the same "
             "federation on all tasks at once for the same total rounds; its final adapter is scored on each "
             "task's test split. DP runs use epsilon 8, delta 1e-5 per client, sample-level; Avalanche "
             "strategies are refused under DP by design, so only naive, replay+EWC and joint run with DP. "
             "Max epsilon is the most any client spent; continual runs calibrate the noise at a client's "
             "smallest task share, so most spend less than 8. "
             "Forgetting, BWT and FWT are in accuracy points (definitions in `continual/metrics.py`). "
             "Each run is a real federation (ServerApp, ClientApp, strategy) driven in-process by "
             "`tests/inprocess.py`'s grid, without Ray, with its own run and state folders in a temporary "
             "folder; the two streams ran side by side, one process and one torch thread each, on a machine "
             "shared with other work, so the seconds are wall time under contention.", "",
             f"**Read with care:** `{result['model']}` is a randomly initialised two-layer model that learns "
             f"weakly; every figure is from one seed, and the test splits hold {min(sizes)}-{max(sizes)} records "
             f"per task, so one record moves a task's accuracy by {100 / max(sizes):.1f}-{100 / min(sizes):.1f} "
             "points. Small forgetting figures are within that noise.", ""]
    verdicts = []
    for s in result["streams"]:
        lines += _stream_lines(s) + observations(s) + [""]
        g = goal(s, False)
        verdicts.append(f"{s['key']}: {'met' if all(g.values()) else 'not met'}")
    lines += ["**Goal** (replay+EWC within 5% of joint's average accuracy and forgetting under 2 points, "
              f"where naive forgets clearly; without DP): {'; '.join(verdicts)}.", ""]
    return lines


# -- main ----------------------------------------------------------------------------------

STREAMS = {"drugs": drug_stream, "headlines": headline_stream}


def run_stream(key: str, root: Path, quick: bool) -> dict:
    stream = STREAMS[key](root)
    stream["key"] = key
    stream["facts"] = stream_facts(stream)
    plan = [(m, False) for m in (["naive"] if quick else METHODS)] + [("joint", False)]
    if not quick:
        plan += [(m, True) for m in DP_METHODS] + [("joint", True)]
    stream["runs"] = []
    for index, (method, dp) in enumerate(plan):
        print(f"== {key} | {method} | dp {dp}", flush=True)
        folder = root / f"{key}-{index}"
        entry = joint_run(stream, dp, folder) if method == "joint" else continual_run(stream, method, dp, folder)
        print(json.dumps({k: v for k, v in entry.items() if k != "avalanche_metrics"}), flush=True)
        stream["runs"].append(entry)
    stream.pop("data")  # temporary paths
    return stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one stream, naive and joint only: checks the script")
    parser.add_argument("--stream", choices=list(STREAMS), help="run one stream, write its result to --out")
    parser.add_argument("--out", type=Path, help="with --stream: where to write the stream's result")
    args = parser.parse_args()
    if args.stream:
        with tempfile.TemporaryDirectory(prefix=f"bench-continual-{args.stream}-") as tmp:
            args.out.write_text(json.dumps(run_stream(args.stream, Path(tmp), args.quick)) + "\n")
        return
    from fedcl.config import load_config

    base = load_config(None, COMMON + METHOD_SETTINGS)
    result = {"model": base.model.name, "when": time.strftime("%Y-%m-%d %H:%M"), "clients": base.federation.clients,
              "rounds_per_task": base.continual.rounds_per_task, "local_steps": base.train.local_steps,
              "batch_size": base.train.batch_size, "lr": base.train.lr,
              "replay_capacity": base.continual.replay_capacity, "ewc_strength": base.continual.ewc_strength}
    keys = ["drugs"] if args.quick else list(STREAMS)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-continual-") as tmp:
        # One process per stream, one torch thread each: the two cores' worth of threads
        # a single two-thread process would use, but the streams' runs overlap.
        procs = {}
        for key in keys:
            cmd = [sys.executable, "-m", "bench.continual", "--stream", key, "--out", f"{tmp}/{key}.json"]
            log = open(f"{tmp}/{key}.log", "w")
            procs[key] = (subprocess.Popen(cmd + (["--quick"] if args.quick else []), cwd=ROOT, stdout=log,
                                           stderr=subprocess.STDOUT), log)
        for key, (proc, log) in procs.items():
            proc.wait()
            log.close()
            text = Path(f"{tmp}/{key}.log").read_text()
            print("\n".join(line for line in text.splitlines() if line.startswith(("== ", "{"))), flush=True)
            if proc.returncode != 0:
                raise RuntimeError(f"stream {key} failed:\n{text[-3000:]}")
        result["streams"] = [json.loads(Path(f"{tmp}/{key}.json").read_text()) for key in keys]
    result["total_seconds"] = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    name = "continual-quick.json" if args.quick else RESULT
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / name} ({result['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
