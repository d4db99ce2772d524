"""Strategy benchmark (issue 4): accuracy, speed and traffic of every aggregation
strategy on an IID and a strongly non-IID split, FedAvg's aggregation error on
real client updates, and a poisoned client against the robust aggregators.

    .venv/bin/python -m bench.strategies [--seeds 0,1] [--rounds 10] [--quick]
    .venv/bin/python -m bench.strategies --profile pretrained

Every federation runs in this process through the real ServerApp, ClientApp
and strategy, run in-process by `fedcl.ops.run.run_inprocess` (no Ray:
starting it costs about 15 s a run, and a run here takes under a minute).

- Per split and strategy: final accuracy of the global adapter on the global
  test split, the first round it reaches a target accuracy, and the bytes
  each round carried up and down (from the run's metrics.json).
- Aggregation error: the clean FedAvg runs capture every client's reply; per
  round and LoRA module, FedAvg's product mean(B) mean(A) is compared with the
  exact weighted mean of the clients' B_i A_i (the stacking of
  `strategies.flora`), as a relative Frobenius norm.
- Poisoning: on the IID split one of five clients replies with the global
  adapter minus `POISON_SCALE` times its real update (a scaled sign flip);
  FedAvg and the robust strategies are compared with the clean FedAvg run.

`--profile pretrained` uses the pretrained SmolLM2-135M cut to its first 6
layers (`model.layers`), which learns the task, on fedavg, ffa-lora and flora
plus the poisoning block; its federations run as subprocesses, two at a time
with one torch thread each. The profile reaches worker processes through the
FEDCL_BENCH_PROFILE environment variable, read at import.

`--profile pretrained --lr-sweep 3e-3,1e-2,3e-2` (or `--runs fedavg:1e-2,ffa-lora:3e-2`
for chosen pairs, in that order) runs each strategy at each learning rate on
both splits with the profile's other settings and no poisoning, and writes
strategies_lr_pretrained.json after every finished federation; `--seeds 1
--append` adds repeats of chosen settings to it. Its rendering picks each
method's best learning rate on the test split and compares the exact methods
with FedAvg there. A run may set more than its lr (`--runs
ffa-lora:1e-2:lora.r=16+lora.alpha=32`); it is then shown as its own method,
named with those settings. `--merge FILE` adds a sweep run side by side (its
own `--result FILE`, same settings) to `--result`.

Writes bench/results/strategies.json (strategies_pretrained.json under the
pretrained profile); run folders go to a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedcl import flora, keys
from fedcl.config import STRATEGY_NAMES, load_config
from fedcl.federation.messages import decode_update
from fedcl.ops.run import run_inprocess
from fedcl.session import GlobalEvaluator

RESULT = "strategies.json"
# Learning-rate sweep of the pretrained profile (`--lr-sweep`); rendered by `render` like the others.
LR_RESULT = "strategies_lr_pretrained.json"
# The same sweep's best lr per method over 10 rounds (`--rounds 10 --result ...`).
LONG_RESULT = "strategies_lr10_pretrained.json"
EXTRA_RESULTS = ["strategies_pretrained.json", LR_RESULT, LONG_RESULT]
RESULTS = Path(__file__).parent / "results"
PROFILE = os.environ.get("FEDCL_BENCH_PROFILE", "tiny")

# The default 135M model costs about 3 s a step on 2 shared cores, too slow
# for ~25 federations; the 2-layer random tiny model learns weakly but visibly
# at these settings (measured: majority 0.559 -> about 0.60 in 10 rounds, IID).
SETTINGS = ["model.name=tiny-llama", "data.dataset=drugreview-condition", "federation.clients=5",
            "train.local_steps=20", "train.lr=1e-2", "train.batch_size=8"]
MODEL = "tiny-llama"
STRATEGIES = STRATEGY_NAMES
DEFAULT_ROUNDS, DEFAULT_PARALLEL = 10, 1
if PROFILE == "pretrained":
    # Pretrained SmolLM2 cut to 6 of 30 layers: learns the task in a few rounds
    # (measured: 0.68-0.74 against a majority of 0.56) at about 0.8 s a step.
    # Two federations at a time, one torch thread each, on 2 cores; 12 local steps
    # (not 20) so the 10 federations fit in about 25 minutes (measured: 0.7 s a step).
    SETTINGS = ["model.name=smollm2-135m", "model.layers=6", "model.threads=1",
                "data.dataset=drugreview-condition", "federation.clients=5",
                "train.local_steps=12", "train.lr=3e-3", "train.batch_size=8"]
    MODEL = "smollm2-135m, first 6 layers"
    STRATEGIES = ("fedavg", "ffa-lora", "flora")
    DEFAULT_ROUNDS, DEFAULT_PARALLEL = 5, 2
SPLITS = {"iid": ["data.partition=iid"], "dirichlet": ["data.partition=dirichlet", "data.alpha=0.1"]}
EXACT = ("ffa-lora", "flora")
ROBUST = ("median", "trimmed-mean", "krum")
POISONED_CLIENT = 4
POISON_SCALE = 10.0
# Goal: a robust strategy under poisoning within this much accuracy of the clean FedAvg run.
POISON_TOLERANCE = 0.02


def run_federation(overrides: list[str], out: Path, intercept=None) -> dict:
    """One federation through the real apps; returns its metrics.json plus wall seconds."""
    config = load_config(None, overrides + [f"run.out_dir={out}"])
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log, contextlib.redirect_stdout(log):
        # clients print one line per round; kept in the log
        run_inprocess(config, intercept=skip_empty_evaluations(intercept))
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - start
    return metrics


def summarise(metrics: dict) -> dict:
    rounds = metrics["rounds"]
    return {"accuracy": [r["eval"]["accuracy"] for r in rounds],
            "majority": rounds[-1]["eval"]["majority_baseline"],
            "initial_accuracy": metrics["initial_eval"]["accuracy"],
            "bytes_up": [r["bytes_up"] for r in rounds], "bytes_down": [r["bytes_down"] for r in rounds],
            "rejected": sum(r.get("rejected", 0) for r in rounds),
            "adapter_bytes": metrics["model"]["adapter_bytes"], "wall_seconds": metrics["wall_seconds"]}


class ReplyRecorder:
    """Intercept hook keeping each round's train replies (update, examples) as sent."""

    def __init__(self):
        self.rounds: list[list[tuple[dict, float]]] = []
        self._last_type = None

    def __call__(self, partition_id: int, reply):
        kind = reply.metadata.message_type
        if kind == "train" and self._last_type != "train":  # a round's train replies come together
            self.rounds.append([])
        self._last_type = kind
        if kind == "train" and not reply.has_error():
            metrics = next(iter(reply.content.metric_records.values()))
            self.rounds[-1].append((reply.content["arrays"], float(metrics[keys.NUM_EXAMPLES_MSG])))
        return reply


def skip_empty_evaluations(intercept=None):
    """Drop evaluate replies of clients that hold no evaluation records, then apply `intercept`.

    Under Dirichlet(0.1) a client's held-out share can be empty; its evaluate
    reply then lacks the accuracy keys and Flower refuses to average the
    clients' MetricRecords, ending the run. Client-side evaluation is not what
    this benchmark measures (the global test split is), so such a reply is
    treated as a node that did not answer.
    """
    def hook(partition_id: int, reply):
        if reply.metadata.message_type == "evaluate" and not reply.has_error():
            metrics = next(iter(reply.content.metric_records.values()))
            if int(metrics.get(keys.NUM_EXAMPLES_MSG, 0)) == 0:
                return None
        return reply if intercept is None else intercept(partition_id, reply)
    return hook


def poison(partition_id: int, reply):
    """Client POISONED_CLIENT sends global - s (local - global) instead of its local adapter.

    With float16 transport a reply carries the update local - global, so the
    attack is the update times -s (checked: the run's transport must be float16).
    """
    if partition_id != POISONED_CLIENT or reply.metadata.message_type != "train" or reply.has_error():
        return reply
    arrays = reply.content["arrays"]
    reply.content["arrays"] = ArrayRecord(OrderedDict(
        (name, Array((-POISON_SCALE * arr.numpy().astype(np.float32)).astype(np.float16)))
        for name, arr in arrays.items()))
    return reply


def product_errors(start: dict, replies: list[tuple[ArrayRecord, float]], transport: str) -> dict:
    """FedAvg's factor averaging against the exact weighted mean of B_i A_i, per LoRA module."""
    states = [{k: start[k] + u[k] for k in start} for u in
              (decode_update(record, start, transport) for record, _ in replies)]
    weights = [n for _, n in replies]
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    exact_factors = flora.stack_products([flora.factors_of(s) for s in states], weights, [1.0] * len(states))
    mean_state = {k: sum(wi * s[k].double() for wi, s in zip(w, states)) for k in start}
    averaged, begin = flora.factors_of(mean_state), flora.factors_of(start)
    rel_product, rel_update, stacking_check = [], [], []
    for module, (b, a) in exact_factors.items():
        exact = b @ a
        direct = sum(wi * f[module][0].double() @ f[module][1].double()
                     for wi, f in zip(w, (flora.factors_of(s) for s in states)))
        gap = averaged[module][0] @ averaged[module][1] - exact
        update = exact - begin[module][0].double() @ begin[module][1].double()
        rel_product.append(float(gap.norm() / exact.norm()))
        rel_update.append(float(gap.norm() / update.norm()))
        stacking_check.append(float((exact - direct).norm() / direct.norm()))
    return {"modules": len(rel_product), "clients": len(states),
            "relative_to_product": {"mean": statistics.fmean(rel_product), "max": max(rel_product)},
            "relative_to_update": {"mean": statistics.fmean(rel_update), "max": max(rel_update)},
            "stacking_max_error": max(stacking_check)}


def aggregation_errors(overrides: list[str], out: Path, recorder: ReplyRecorder) -> list[dict]:
    """Per round of a finished FedAvg run: the product-space error on its captured replies."""
    config = load_config(None, overrides + [f"run.out_dir={out}"])
    evaluator = GlobalEvaluator(config)
    result = []
    for index, replies in enumerate(recorder.rounds):
        start = evaluator.initial_state if index == 0 else evaluator.load_saved(out / "adapters" / f"round-{index}")
        result.append({"round": index + 1, **product_errors(start, replies, config.strategy.transport)})
    return result


def run_spec(spec: dict, tmp: Path) -> dict:
    """One federation of the benchmark: its summary, and for clean FedAvg its aggregation errors."""
    out = tmp / f"{spec['split']}-{spec['name'].replace(' ', '_')}-{spec['seed']}" if not spec["poisoned"] else \
        tmp / f"poisoned-{spec['name']}-{spec['seed']}"
    recorder = ReplyRecorder() if spec["record"] else None
    summary = summarise(run_federation(spec["overrides"], out, poison if spec["poisoned"] else recorder))
    if recorder is not None:
        summary["aggregation_error"] = aggregation_errors(spec["overrides"], out, recorder)
    return summary


def _worker(spec: dict) -> dict:
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-strategies-") as tmp:
        return run_spec(spec, Path(tmp))


def _launch(spec: dict) -> dict:
    """Run one spec in a subprocess (`--worker`); a failure is reported, not fatal."""
    out = subprocess.run([sys.executable, "-m", "bench.strategies", "--worker", json.dumps(spec)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        print(f"worker {spec['split']} {spec['name']} poisoned={spec['poisoned']} failed:\n"
              f"{out.stderr[-3000:]}", flush=True)
        return {"error": out.stderr[-3000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _specs(base: list[str], seeds: list[int]) -> list[dict]:
    specs = []
    for seed in seeds:
        for split, split_overrides in SPLITS.items():
            for name in STRATEGIES:
                specs.append({"split": split, "name": name, "seed": seed, "poisoned": False,
                              "record": name == "fedavg",
                              "overrides": base + split_overrides + [f"strategy.name={name}", f"train.seed={seed}"]})
        for name in ("fedavg", *ROBUST):
            specs.append({"split": "iid", "name": name, "seed": seed, "poisoned": True, "record": False,
                          "overrides": base + SPLITS["iid"] + [f"strategy.name={name}", f"train.seed={seed}",
                                                               "strategy.transport=float16"]})
    return specs


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    parser.add_argument("--rounds", type=int, default=None, help=f"default {DEFAULT_ROUNDS}")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 2 steps: checks the script")
    parser.add_argument("--profile", choices=("tiny", "pretrained"), default="tiny")
    parser.add_argument("--parallel", type=int, default=None,
                        help=f"federations at a time, as subprocesses above 1 (default {DEFAULT_PARALLEL})")
    parser.add_argument("--lr-sweep", default=None, metavar="LRS",
                        help="comma-separated train.lr values: runs --strategies at each on --splits "
                             f"(pretrained profile only, no poisoning), written to {LR_RESULT}")
    parser.add_argument("--runs", default=None, metavar="NAME:LR[:KEY=VALUE+...],...",
                        help="explicit strategy:lr pairs for the sweep, run in this order (instead of "
                             "--lr-sweep x --strategies); a third part sets other settings of that run, "
                             "e.g. ffa-lora:3e-2:lora.r=16+lora.alpha=32, shown as its own method")
    parser.add_argument("--strategies", default="fedavg,ffa-lora", help="sweep strategies")
    parser.add_argument("--splits", default=",".join(SPLITS), help="sweep splits")
    parser.add_argument("--import-previous", action="store_true",
                        help=f"add to {LR_RESULT} the runs of {EXTRA_RESULTS[0]} (same settings, its one lr), "
                             "marked with their source, where the sweep has no run of the same seed")
    parser.add_argument("--result", default=LR_RESULT, help=f"the sweep's result file (default {LR_RESULT})")
    parser.add_argument("--merge", default=None, metavar="FILE",
                        help="add the runs of another sweep file in bench/results (same settings, e.g. one "
                             "run side by side with --result FILE) to --result, then delete FILE")
    parser.add_argument("--append", action="store_true",
                        help=f"add the sweep's runs to the existing {LR_RESULT} (same settings), replacing "
                             "runs of the same split, strategy, lr and seed")
    args = parser.parse_args()
    if args.merge:
        merge_sweeps(RESULTS / args.result, RESULTS / args.merge)
        return
    sweep = bool(args.lr_sweep or args.runs or args.import_previous)
    if sweep and args.profile != "pretrained":
        parser.error("--lr-sweep and --runs need --profile pretrained")
    if args.profile != PROFILE:  # the module's settings are read at import: start again with it set
        os.environ["FEDCL_BENCH_PROFILE"] = args.profile
        os.execv(sys.executable, [sys.executable, "-m", "bench.strategies", *sys.argv[1:]])
    seeds = [int(s) for s in args.seeds.split(",")]
    rounds = 2 if args.quick else (args.rounds or DEFAULT_ROUNDS)
    parallel = args.parallel or DEFAULT_PARALLEL
    base = SETTINGS + [f"federation.rounds={rounds}"] + (["train.local_steps=2"] if args.quick else [])
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower's per-round summaries would drown the table
    if sweep:
        lr_sweep(args, base, seeds, parallel)
        return
    started = time.perf_counter()
    results = {"model": MODEL, "when": time.strftime("%Y-%m-%d %H:%M"), "settings": base, "seeds": seeds,
               "parallel": parallel, "poisoned_client": POISONED_CLIENT, "poison_scale": POISON_SCALE,
               "runs": {split: {name: [] for name in STRATEGIES} for split in SPLITS},
               "poisoned": {name: [] for name in ("fedavg", *ROBUST)},
               "aggregation_error": {split: [] for split in SPLITS}, "failed": []}
    specs = _specs(base, seeds)

    def in_process(spec: dict) -> dict:
        with tempfile.TemporaryDirectory(prefix="bench-strategies-") as tmp:
            return run_spec(spec, Path(tmp))

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        # one at a time: in this process's main thread; more: subprocesses, results in spec order
        summaries = pool.map(_launch, specs) if parallel > 1 else map(in_process, specs)
        for spec, summary in zip(specs, summaries):
            label = "poisoned" if spec["poisoned"] else spec["split"]
            if "error" in summary:
                results["failed"].append({k: spec[k] for k in ("split", "name", "seed", "poisoned")})
                continue
            errors = summary.pop("aggregation_error", None)
            if spec["poisoned"]:
                results["poisoned"][spec["name"]].append(summary)
            else:
                results["runs"][spec["split"]][spec["name"]].append(summary)
            if errors is not None:
                results["aggregation_error"][spec["split"]].append({"seed": spec["seed"], "rounds": errors})
            print(f"{label:9s} {spec['name']:12s} seed {spec['seed']} | accuracy {summary['accuracy'][-1]:.3f} "
                  f"| {summary['wall_seconds']:.0f} s", flush=True)
    results["wall_seconds"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / (RESULT if PROFILE == "tiny" else EXTRA_RESULTS[0])).write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(render(results)))


def _lr_key(lr: str) -> str:
    return f"{float(lr):g}"


def method_label(name: str, extra: list[str]) -> str:
    """How a run with settings beyond the profile's is named in the results: "ffa-lora lora.r=16 ..."."""
    return " ".join([name, *extra])


def _strategy(label: str) -> str:
    return label.split(" ", 1)[0]


def _method_order(label: str) -> tuple[int, str]:
    return STRATEGY_NAMES.index(_strategy(label)), label


def _sweep_specs(args, base: list[str], seeds: list[int]) -> list[dict]:
    if args.runs:
        triples = []
        for item in args.runs.split(","):
            name, lr, *rest = item.split(":")
            if len(rest) > 1:
                raise SystemExit(f"--runs: {item!r} is not NAME:LR or NAME:LR:KEY=VALUE+...")
            extra = rest[0].split("+") if rest else []
            if any("=" not in kv or kv.startswith(("strategy.name=", "train.lr=", "train.seed=")) for kv in extra):
                raise SystemExit(f"--runs: {item!r}: extra settings are KEY=VALUE, other than the strategy, "
                                 "lr and seed")
            triples.append((name, lr, extra))
    else:
        triples = [(name, lr, []) for lr in args.lr_sweep.split(",") for name in args.strategies.split(",")]
    splits = args.splits.split(",")
    unknown = {n for n, _, _ in triples} - set(STRATEGY_NAMES) | set(splits) - set(SPLITS)
    if unknown:
        raise SystemExit(f"unknown strategy or split: {', '.join(sorted(unknown))}")
    for name, lr, extra in triples:  # a bad setting fails here, not in a worker minutes later
        load_config(None, base + [f"strategy.name={name}", f"train.lr={lr}", *extra])
    return [{"split": split, "name": method_label(name, extra), "seed": seed, "lr": _lr_key(lr), "poisoned": False,
             "record": False, "overrides": base + SPLITS[split] + [f"strategy.name={name}", f"train.lr={lr}",
                                                                  f"train.seed={seed}", *extra]}
            for seed in seeds for name, lr, extra in triples for split in splits]


def lr_sweep(args, base: list[str], seeds: list[int], parallel: int) -> None:
    """Each (strategy, lr, split, seed) federation in a subprocess, `parallel` at a time.

    The result file is rewritten after every finished federation, so an
    interrupted sweep keeps what it measured; `--quick` writes to the temporary
    directory instead of bench/results.
    """
    settings = [s for s in base if not s.startswith("train.lr=")]  # every run sets its own lr
    path = (Path(tempfile.gettempdir()) / f"quick-{args.result}") if args.quick else RESULTS / args.result
    if args.append and path.exists():
        results = json.loads(path.read_text())
        if results["settings"] != settings:
            raise SystemExit(f"{path}: measured with {results['settings']}, not {settings}; not appending")
    else:
        results = {"kind": "lr-sweep", "model": MODEL, "when": time.strftime("%Y-%m-%d %H:%M"),
                   "settings": settings, "runs": {}, "sessions": [], "failed": []}
    if args.import_previous:
        import_previous(results, RESULTS / EXTRA_RESULTS[0])
    specs = _sweep_specs(args, base, seeds) if args.lr_sweep or args.runs else []
    session = {"when": time.strftime("%Y-%m-%d %H:%M"), "parallel": parallel, "federations": 0,
               "wall_seconds": 0.0}
    if specs:
        results["sessions"].append(session)
        results["when"] = session["when"]
    started = time.perf_counter()
    path.parent.mkdir(exist_ok=True)
    print(f"{len(specs)} federations, {parallel} at a time; writing {path}", flush=True)
    with ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
        futures = {pool.submit(_launch, spec): spec for spec in specs}
        for future in as_completed(futures):
            spec, summary = futures[future], future.result()
            if "error" in summary:
                results["failed"].append({k: spec[k] for k in ("split", "name", "lr", "seed")})
            else:
                summary["seed"] = spec["seed"]
                _put_runs(results, spec["split"], spec["name"], spec["lr"], [summary])
                session["federations"] += 1
                print(f"{spec['split']:9s} {spec['name']:9s} lr {spec['lr']:6s} seed {spec['seed']} | accuracy "
                      f"{summary['accuracy'][-1]:.3f} | {summary['wall_seconds']:.0f} s", flush=True)
            session["wall_seconds"] = time.perf_counter() - started
            path.write_text(json.dumps(results, indent=2) + "\n")
    path.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(render(results)))


def _put_runs(results: dict, split: str, name: str, lr: str, summaries: list[dict]) -> None:
    """Add a sweep's runs of one setting, replacing the runs of the same seeds."""
    per_lr = results["runs"].setdefault(split, {}).setdefault(name, {})
    seeds = {s["seed"] for s in summaries}
    per_lr[lr] = [s for s in per_lr.get(lr, []) if s["seed"] not in seeds] + summaries


def merge_sweeps(target: Path, source: Path) -> None:
    """Add `source`'s runs to `target` (a run of the same split, method, lr and seed is replaced), its
    sessions and failures too, and delete `source`: two sweeps run side by side become one result."""
    into, extra = (json.loads(p.read_text()) for p in (target, source))
    if into["settings"] != extra["settings"]:
        raise SystemExit(f"{source}: measured with {extra['settings']}, not {into['settings']}; not merging")
    for split, by_name in extra["runs"].items():
        for name, per_lr in by_name.items():
            for lr, summaries in per_lr.items():
                _put_runs(into, split, name, lr, summaries)
    into["sessions"] += extra["sessions"]
    into["failed"] += extra["failed"]
    into["when"] = max(into["when"], extra["when"])
    target.write_text(json.dumps(into, indent=2) + "\n")
    source.unlink()
    print(f"merged {source.name} into {target.name}")


def import_previous(results: dict, source: Path) -> None:
    """Copy the clean runs of the profile's main result (one lr) into the sweep, marked with their source.

    A run of the same split, strategy, lr and seed already in the sweep is kept and the copy skipped.
    """
    previous = json.loads(source.read_text())
    lr = next(s.split("=", 1)[1] for s in previous["settings"] if s.startswith("train.lr="))
    settings = [s for s in previous["settings"] if not s.startswith("train.lr=")]
    if settings != results["settings"]:
        raise SystemExit(f"{source}: measured with {settings}, not {results['settings']}; not importing")
    for split, by_name in previous["runs"].items():
        for name, runs in by_name.items():
            per_lr = results["runs"].setdefault(split, {}).setdefault(name, {})
            have = {s["seed"] for s in per_lr.get(_lr_key(lr), [])}
            for seed, summary in zip(previous["seeds"], runs):
                if seed not in have:
                    per_lr.setdefault(_lr_key(lr), []).append(
                        {**summary, "seed": seed, "source": f"{source.name}, measured {previous['when']}"})


# -- rendering -----------------------------------------------------------------
def _final(runs: list[dict]) -> list[float]:
    return [r["accuracy"][-1] for r in runs]


def _mean_curve(runs: list[dict]) -> list[float]:
    return [statistics.fmean(values) for values in zip(*(r["accuracy"] for r in runs))]


def _per_round(runs: list[dict], key: str) -> float:
    return statistics.fmean(statistics.fmean(r[key]) for r in runs)


def _acc(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def target_accuracy(runs: dict[str, list[dict]]) -> float | None:
    """Halfway between the majority baseline and the best mean final accuracy of the split."""
    majority = next(iter(runs.values()))[0]["majority"]
    best = max(statistics.fmean(_final(r)) for r in runs.values())
    return None if best <= majority else majority + (best - majority) / 2


def rounds_to(curve: list[float], target: float | None) -> int | None:
    if target is None:
        return None
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target - 1e-9), None)


def exact_goal(runs: dict[str, list[dict]]) -> list[str]:
    """Exact methods whose accuracy is at least FedAvg's with no more traffic."""
    fedavg = runs["fedavg"]
    ref_acc = statistics.fmean(_final(fedavg))
    ref_bytes = _per_round(fedavg, "bytes_up") + _per_round(fedavg, "bytes_down")
    return [name for name in EXACT if name in runs and statistics.fmean(_final(runs[name])) >= ref_acc
            and _per_round(runs[name], "bytes_up") + _per_round(runs[name], "bytes_down") <= ref_bytes]


def _pretrained(r: dict) -> bool:
    return r.get("model", "tiny-llama").startswith("smollm2")  # results before the profile name no model


def render(r: dict) -> list[str]:
    if r.get("kind") == "lr-sweep":
        return render_lr_sweep(r)
    # strategies with no finished run (a failed worker) are left out of the tables
    r = {**r, "runs": {split: {n: v for n, v in runs.items() if v} for split, runs in r["runs"].items()},
         "poisoned": {n: v for n, v in r["poisoned"].items() if v}}
    seeds, first = r["seeds"], r["runs"]["iid"]["fedavg"][0]
    rounds = len(first["accuracy"])
    model, parallel = r.get("model", "tiny-llama"), r.get("parallel", 1)
    federations = sum(len(v) for s in r["runs"].values() for v in s.values()) + \
        sum(len(v) for v in r["poisoned"].values())
    how = ("in one process, one after another," if parallel == 1 else
           f"in its own process, {parallel} at a time with one torch thread each,")
    noise = ("one seed: no spread measured" if len(seeds) == 1 else
             "accuracies are the mean over seeds with (min-max)")
    if _pretrained(r):
        about_model = [
            f"The model is the pretrained SmolLM2-135M cut to its first 6 of 30 layers (`model.layers=6`), "
            f"which learns this task (from {first['initial_accuracy']:.3f} before round 1, majority class "
            f"{first['majority']:.3f}, {rounds} rounds), unlike the tiny random model of the section above. "
            f"Only fedavg, {' and '.join(EXACT)} were run on the two splits, plus the poisoning runs "
            f"({federations} federations); {noise}, so differences of a point or two may still be noise."]
    else:
        about_model = [
            f"The model is the 2-layer randomly initialised `tiny-llama`, not SmolLM2-135M (about 3 s a step "
            f"here, too slow for {federations} federations). It learns weakly (from "
            f"{first['initial_accuracy']:.3f} before round 1, majority class {first['majority']:.3f}, "
            f"{rounds} rounds), so differences of a few points between strategies may be noise"
            + (" (one seed: no spread measured)." if len(seeds) == 1 else
               "; accuracies are the mean over seeds with (min-max).")]
    lines = [
        f"## Strategies ({model}, measured {r['when']})", "",
        f"Settings: `{' '.join(r['settings'])}`, seeds {', '.join(map(str, seeds))}; splits "
        "`data.partition=iid` and `data.partition=dirichlet` with `data.alpha=0.1`. Every federation ran "
        f"{how} through the real ServerApp, ClientApp and strategies (`tests/inprocess.py`'s "
        f"InProcessGrid instead of Ray), {r['wall_seconds'] / 60:.0f} minutes in all. Client-side evaluate "
        "replies of clients with no held-out records were dropped (under Dirichlet(0.1) such a reply lacks "
        "the metric keys and Flower's averaging of client metrics stops the run); accuracy is the global "
        "adapter's on the global test split.",
        "",
        *about_model,
        "",
    ]
    if r.get("failed"):
        lines += ["Runs that failed (left out): " + ", ".join(
            f"{'poisoned ' if f['poisoned'] else ''}{f['name']} on {f['split']} (seed {f['seed']})"
            for f in r["failed"]) + ".", ""]
    for split, runs in r["runs"].items():
        target = target_accuracy(runs)
        target_text = "no strategy beat the majority class, so no target" if target is None else \
            f"target {target:.3f}, halfway from the majority class to the best final accuracy"
        lines += [f"### {split} split ({target_text})", "",
                  "| strategy | final accuracy | best round accuracy | rounds to target | bytes up / round "
                  "| bytes down / round |", "|---|---|---|---|---|---|"]
        for name, per_seed in runs.items():
            curve = _mean_curve(per_seed)
            reached = rounds_to(curve, target)
            lines.append(f"| {name} | {_acc(_final(per_seed))} | {max(curve):.3f} | "
                         f"{reached if reached is not None else 'not reached'} | "
                         f"{_per_round(per_seed, 'bytes_up') / 1e3:.1f} kB | "
                         f"{_per_round(per_seed, 'bytes_down') / 1e3:.1f} kB |")
        lines.append("")
    lines += _aggregation_lines(r)
    lines += _poison_lines(r)
    lines += _goal_lines(r)
    return lines


def _aggregation_lines(r: dict) -> list[str]:
    lines = ["### FedAvg's aggregation error on real client updates", "",
             "Relative Frobenius error of mean(B) mean(A) against the exact weighted mean of the clients' "
             "B_i A_i (`strategies.flora`'s stacking), per LoRA module, on the replies of the clean FedAvg "
             "runs. Relative to the aggregate product, and relative to the round's exact update of the "
             "product (exact mean minus the global's product; equal in round 1, where B starts at zero).", "",
             "| split | round | modules | error / product (mean, max) | error / update (mean, max) |",
             "|---|---|---|---|---|"]
    for split, per_seed in r["aggregation_error"].items():
        for entry in per_seed[:1]:  # one seed's rounds; the others agree in kind
            shown = [x for x in entry["rounds"] if x["round"] in (1, 2, len(entry["rounds"]))]
            for x in shown:
                p, u = x["relative_to_product"], x["relative_to_update"]
                lines.append(f"| {split} | {x['round']} | {x['modules']} | {p['mean']:.3f}, {p['max']:.3f} "
                             f"| {u['mean']:.3f}, {u['max']:.3f} |")
    check = max(x["stacking_max_error"] for s in r["aggregation_error"].values() for e in s for x in e["rounds"])
    return lines + ["", f"Stacking against a direct float64 sum of B_i A_i: largest relative error {check:.1e}.", ""]


def _poison_lines(r: dict) -> list[str]:
    clean = _final(r["runs"]["iid"]["fedavg"])
    lines = [f"### One of five clients poisoned (IID split, client {r['poisoned_client']} sends "
             f"global - {r['poison_scale']:g} x its update)", "",
             "| strategy | final accuracy, poisoned | same strategy, clean | vs clean FedAvg "
             f"({statistics.fmean(clean):.3f}) | within {100 * POISON_TOLERANCE:.0f} points |",
             "|---|---|---|---|---|"]
    for name, per_seed in r["poisoned"].items():
        gap = statistics.fmean(_final(per_seed)) - statistics.fmean(clean)
        same = r["runs"]["iid"].get(name)
        lines.append(f"| {name} | {_acc(_final(per_seed))} | {_acc(_final(same)) if same else 'not run'} | "
                     f"{100 * gap:+.1f} points | {'yes' if gap >= -POISON_TOLERANCE else 'no'} |")
    return lines + [""]


def _goal_lines(r: dict) -> list[str]:
    clean = statistics.fmean(_final(r["runs"]["iid"]["fedavg"]))
    robust_ok = [n for n in ROBUST if n in r["poisoned"]
                 and statistics.fmean(_final(r["poisoned"][n])) >= clean - POISON_TOLERANCE]
    exact = {split: exact_goal(runs) for split, runs in r["runs"].items()}
    fedavg_hit = statistics.fmean(_final(r["poisoned"]["fedavg"])) - clean
    lines = ["| goal | measured | met |", "|---|---|---|"]
    for split, names in exact.items():
        lines.append(f"| an exact method at least matches FedAvg's accuracy with equal or less traffic "
                     f"({split}) | {', '.join(names) or 'neither ffa-lora nor flora'} | "
                     f"{'yes' if names else 'no'} |")
    lines.append(f"| with a poisoned client, a robust strategy stays within 2 points of the clean run "
                 f"| {', '.join(robust_ok) or 'none'} (poisoned FedAvg: {100 * fedavg_hit:+.1f} points) "
                 f"| {'yes' if robust_ok else 'no'} |")
    if _pretrained(r):
        seeds = "one seed, so no spread" if len(r["seeds"]) == 1 else f"{len(r['seeds'])} seeds"
        return lines + ["", "The model learns here, so the accuracy side of both goals is a measurement, "
                        f"from {seeds}: gaps of a point or two can still be noise. The traffic and the "
                        "aggregation error are measured exactly.", ""]
    return lines + ["", "With a model this weak the accuracy side of both goals is close to the noise; "
                    "the traffic and the aggregation error are measured exactly.", ""]


def _traffic(runs: list[dict]) -> float:
    return _per_round(runs, "bytes_up") + _per_round(runs, "bytes_down")


def _lr_order(per_lr: dict[str, list[dict]]) -> list[str]:
    return sorted(per_lr, key=float)


def best_lr(per_lr: dict[str, list[dict]], seed: int) -> str | None:
    """The lr with the highest final accuracy of `seed` (the sweep's seed); the lower lr on a tie."""
    scored = [(next(s["accuracy"][-1] for s in per_lr[lr] if s["seed"] == seed), lr)
              for lr in _lr_order(per_lr) if any(s["seed"] == seed for s in per_lr[lr])]
    return max(scored, key=lambda x: x[0])[1] if scored else None  # max keeps the first (lowest lr) of ties


def sweep_goal(runs: dict[str, dict[str, list[dict]]], seed: int) -> dict:
    """Per method its best lr (on `seed`), mean final accuracy there over the seeds run, and traffic;
    the exact methods that at least match FedAvg's accuracy at its best lr with no more traffic."""
    best = {}
    for name, per_lr in runs.items():
        lr = best_lr(per_lr, seed)
        if lr is not None:
            at = per_lr[lr]
            best[name] = {"lr": lr, "accuracy": statistics.fmean(_final(at)), "finals": _final(at),
                          "seeds": [s["seed"] for s in at], "traffic": _traffic(at)}
    ref = best.get("fedavg")
    met = [] if ref is None else [n for n in sorted(best, key=_method_order) if _strategy(n) in EXACT
                                  and best[n]["accuracy"] >= ref["accuracy"] and best[n]["traffic"] <= ref["traffic"]]
    return {"best": best, "met": met}


def render_lr_sweep(r: dict) -> list[str]:
    runs = {split: {n: {lr: v for lr, v in per_lr.items() if v} for n, per_lr in r["runs"][split].items()}
            for split in SPLITS if split in r["runs"]}  # completion order -> the splits' order
    all_runs = [s for by_name in runs.values() for per_lr in by_name.values() for v in per_lr.values() for s in v]
    if not all_runs:
        return [f"## Strategies: learning-rate sweep ({r['model']}, measured {r['when']})", "", "No finished run.", ""]
    seed = min(s["seed"] for s in all_runs)  # the sweep's seed; extra seeds only repeat chosen settings
    first = all_runs[0]
    rounds = len(first["accuracy"])
    names = sorted({n for by_name in runs.values() for n in by_name}, key=_method_order)
    tried = {n: sorted({lr for by_name in runs.values() for lr in by_name.get(n, {})}, key=float) for n in names}
    walls = [s["wall_seconds"] for s in all_runs if "source" not in s] or [s["wall_seconds"] for s in all_runs]
    sources = sorted({s["source"] for s in all_runs if "source" in s})
    sessions = r.get("sessions", [])
    parallel = max((s["parallel"] for s in sessions), default=1)
    lines = [
        f"## Strategies: learning-rate sweep, {rounds} rounds ({r['model']}, measured {r['when']})", "",
        f"Settings: `{' '.join(r['settings'])}`, with `train.lr` "
        + "; ".join(f"{', '.join(tried[n])} for {n}" for n in names) + "; "
        + " and ".join({"iid": "split `data.partition=iid`",
                        "dirichlet": "split `data.partition=dirichlet` with `data.alpha=0.1`"}[sp] for sp in runs)
        + "; "
        f"seed {seed}, and a second seed only where stated. No poisoning runs. Each federation ran in its own "
        f"process, {parallel} at a time with one torch thread each, through the real ServerApp, ClientApp and "
        f"strategies (InProcessGrid instead of Ray): {len(walls)} federations, {statistics.fmean(walls) / 60:.1f} "
        f"minutes each on average ({min(walls) / 60:.1f}-{max(walls) / 60:.1f}), "
        f"{sum(s['wall_seconds'] for s in sessions) / 60:.0f} minutes in all. Accuracy is the global adapter's on the "
        f"global test split (majority class {first['majority']:.3f}, {first['initial_accuracy']:.3f} before "
        f"round 1), after each of the {rounds} rounds. The machine was shared with other benchmarks, so the "
        "minutes are not comparable between runs.", "",
        "FFA-LoRA freezes A at its initialisation and trains only B, so at FedAvg's learning rate its adapter moves "
        "more slowly; this sweep gives every method its own learning rate before comparing them.", "",
    ]
    if sources:
        lines += ["Rows marked * were not run by this sweep: they are copied from " + " and ".join(sources) +
                  " (the strategy benchmark's pretrained profile, identical settings at its one lr), because "
                  "this sweep did not re-run that setting.", ""]
    # a failed or stopped federation whose setting has a run after all (a repeat, a copied run) is not missing
    missing = [f for f in r.get("failed", []) if not any(
        s["seed"] == f["seed"] for s in runs.get(f["split"], {}).get(f["name"], {}).get(f["lr"], []))]
    if missing:
        lines += ["Runs that failed or were stopped (left out): " + ", ".join(
            f"{f['name']} lr {f['lr']} on {f['split']} (seed {f['seed']})" for f in missing) + ".", ""]
    lines += ["| split | strategy | lr | final accuracy | accuracy after each round | bytes up / round "
              "| bytes down / round | minutes |", "|---|---|---|---|---|---|---|---|"]
    for split, by_name in runs.items():
        for name in sorted(by_name, key=_method_order):
            for lr in _lr_order(by_name[name]):
                per_seed = sorted(by_name[name][lr], key=lambda s: s["seed"])
                finals = ", ".join(f"{s['accuracy'][-1]:.3f} (seed {s['seed']})" for s in per_seed) \
                    if len(per_seed) > 1 else f"{per_seed[0]['accuracy'][-1]:.3f}"
                curve = " / ".join(f"{a:.3f}" for a in next(s for s in per_seed if s["seed"] == seed)["accuracy"]) \
                    if any(s["seed"] == seed for s in per_seed) else "-"
                mark = "*" if any("source" in s for s in per_seed) else ""
                lines.append(f"| {split} | {name} | {lr}{mark} | {finals} | {curve} | "
                             f"{_per_round(per_seed, 'bytes_up') / 1e3:.1f} kB | "
                             f"{_per_round(per_seed, 'bytes_down') / 1e3:.1f} kB | "
                             f"{statistics.fmean(s['wall_seconds'] for s in per_seed) / 60:.1f} |")
    lines += ["", f"Accuracy after each round is seed {seed}'s; bytes are the mean over rounds (FLoRA's download "
              "grows every round, round 1 downloads less for every method).", ""]
    lines += ["| goal (best lr of each method, chosen on the test split) | measured | met |", "|---|---|---|"]
    for split, by_name in runs.items():
        goal = sweep_goal(by_name, seed)
        best = goal["best"]

        def describe(name: str) -> str:
            b = best[name]
            acc = f"{b['accuracy']:.3f}" if len(b["finals"]) == 1 else \
                f"{b['accuracy']:.3f} (mean of seeds {', '.join(map(str, b['seeds']))}: " \
                f"{', '.join(f'{x:.3f}' for x in b['finals'])})"
            return f"{name} lr {b['lr']}: {acc}, {b['traffic'] / 1e6:.2f} MB / round"
        measured = "; ".join(describe(n) for n in names if n in best)
        majority = next(s for v in by_name.values() for x in v.values() for s in x)["majority"]
        if "fedavg" not in best or not any(_strategy(n) in EXACT for n in best):
            met = "not measured"
        elif goal["met"] and best["fedavg"]["accuracy"] <= majority + 1e-9:
            met = f"only vacuously ({', '.join(goal['met'])}): FedAvg did not beat the majority class {majority:.3f}"
        else:
            met = "yes (" + ", ".join(goal["met"]) + ")" if goal["met"] else "no"
        lines.append(f"| {split}: an exact method at its best lr at least matches FedAvg at its best lr with "
                     f"equal or less traffic | {measured} | {met} |")
    lines += ["", f"Each method's learning rate is the one with the best final accuracy of seed {seed} on the global "
              "test split, the same split the goal is judged on (there is no separate validation split), so the "
              "best-lr figures are optimistic for every method alike. Most settings ran one seed (a second where two "
              "are shown; the goal then uses their mean), so gaps of a point or two can be noise.", ""]
    return lines


if __name__ == "__main__":
    main()
