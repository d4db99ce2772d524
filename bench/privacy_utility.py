"""Privacy against utility, and an empirical privacy audit with canaries (issue 3).

    .venv/bin/python -m bench.privacy_utility             # one seed
    .venv/bin/python -m bench.privacy_utility --seeds 2
    .venv/bin/python -m bench.privacy_utility --profile pretrained
    .venv/bin/python -m bench.privacy_utility --profile pretrained --datasets lending-club
        # only the loans; merged into the saved result, whose other datasets and audit are kept
    .venv/bin/python -m bench.privacy_utility --profile pretrained-calibrated --no-audit
        # the pretrained profile's drug-review runs with data.calibrate = true

1. Utility: the final global accuracy and macro-F1 on each dataset with
   sample-level DP-SGD at epsilon 1, 3 and 8 (delta 1e-5), against the same
   federation without DP and against centralised training without DP (one
   client holding all the training records, `clients` x `local_steps` steps
   per round, so it takes as many optimiser steps on as many examples as the
   federation's clients together).
2. Audit: 2m random canaries with random labels, m written into one client's
   training file and m held out; after the federation each canary is scored by
   minus the global model's loss on it, and `fedcl.privacy.audit` turns a
   threshold sweep into an epsilon lower bound, set beside the epsilon the
   ledgers accounted.

Every federation runs the real ServerApp and ClientApp in-process through
`fedcl.ops.run.run_inprocess` (no Ray, whose start costs about 15 s), one
subprocess per run, two at a time with one torch thread each (2 cores); run
and state folders live in a temporary directory, so every DP ledger starts at
zero. Clients keep no evaluation hold-out (data.eval_fraction = 0), so their
empty evaluation replies are dropped before Flower averages them. The model is `tiny-llama` (randomly initialised, two layers): the
135M model's steps are far too slow for thousands of DP steps on 2 shared
cores; `--profile pretrained` uses the pretrained model cut to 6 layers instead.
Writes bench/results/privacy_utility.json (privacy_utility_pretrained.json under
the pretrained profile) after every finished run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from bench import runner

RESULTS = Path(__file__).parent / "results"
RESULT = "privacy_utility.json"
# `--profile pretrained` (passed to the worker processes through the environment): the
# pretrained SmolLM2 cut to its first 6 layers (`model.layers`), which learns the
# drug-review task within a few rounds at a fifth of the full model's step cost.
PROFILE = os.environ.get("FEDCL_BENCH_PROFILE", "tiny")
PROFILES = ("tiny", "pretrained", "pretrained-calibrated")
EXTRA_RESULTS = ["privacy_utility_pretrained.json", "privacy_utility_pretrained_calibrated.json"]
RESULT_OF_PROFILE = dict(zip(PROFILES, [RESULT, *EXTRA_RESULTS]))
# `--profile pretrained-calibrated`: the pretrained profile with the label scores calibrated
# (data.calibrate: the base model's scores for an empty review subtracted), on the drug
# reviews only. The untuned 6-layer model puts all its weight on one label ("Acne", 13% of
# the test split); without calibration the first rounds' gradient, and under DP most of the
# budget, go into undoing that prior.
CALIBRATED = PROFILE == "pretrained-calibrated"
MODEL = "tiny-llama" if PROFILE == "tiny" else "smollm2-135m"
EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5
GOAL_FRACTION = 0.95  # at epsilon 8, of the non-private federated accuracy
# Clients hold out nothing for their own evaluation: every record trains (DP
# needs the records) and the server's test split is what is reported.
COMMON_LAYERS = 6  # of the pretrained model's 30, under --profile pretrained
COMMON = [f"model.name={MODEL}", "model.threads=1", "data.eval_fraction=0"] + \
    ([] if PROFILE == "tiny" else [f"model.layers={COMMON_LAYERS}"]) + (["data.calibrate=true"] if CALIBRATED else [])
DATASETS = {
    # 196 training reviews: ~65 per client, the hard case for DP.
    "drugreview-condition": {"clients": 3, "rounds": 8, "local_steps": 20, "batch_size": 8, "lr": 1e-2,
                             "extra": []},
    # 7,886 loans: ~2,630 per client. The test split is capped (stratified) to
    # keep the server's per-round evaluation affordable; 4 rounds of 40 steps
    # (as many steps as 8 of 20) halve the number of evaluations.
    "lending-club": {"clients": 3, "rounds": 4, "local_steps": 40, "batch_size": 32, "lr": 1e-2,
                     "extra": ["data.max_test_records=600"]},
}
# DP runs use the same learning rate and batch unless a dataset names its own here.
DP_SETTINGS: dict[str, dict] = {}
if PROFILE != "tiny":
    DATASETS = {"drugreview-condition": {"clients": 3, "rounds": 4, "local_steps": 20, "batch_size": 8,
                                         "lr": 3e-3, "extra": []},
                # ~2,630 loans per client, the realistic case for DP. model.max_length stays 64:
                # the text after the prompt keeps amount, term, interest rate, sub-grade, state,
                # verification status and part of the income (about 54 of ~196 tokens).
                # 2 rounds x 16 steps of 16 loans (~512 per client) and a stratified 400-record
                # test cap: a non-private run within about ten minutes on 2 shared cores.
                "lending-club": {"clients": 3, "rounds": 2, "local_steps": 16, "batch_size": 16,
                                 "lr": 3e-3, "extra": ["data.max_test_records=400"]}}
    # DP-SGD on the loans: an expected (Poisson) batch of 64 (Opacus divides the noisy sum by
    # it, so the noise on the mean gradient is multiplier x clip / 64) and a higher learning
    # rate; 6 steps a round, since a step of 64 per-sample gradients costs about five of 16
    # plain ones (~768 loans per client over the run, ~1.5x the non-private run's).
    DP_SETTINGS = {"lending-club": {"batch_size": 64, "lr": 1e-2, "local_steps": 6}}
if CALIBRATED:
    DATASETS = {"drugreview-condition": DATASETS["drugreview-condition"]}
AUDIT = {"dataset": "drugreview-condition", "canaries": 50, "epsilon": 8.0, "alpha": 0.05}


# -- one run (in a worker process) ---------------------------------------------------

def _overrides(dataset: str, *, epsilon: float, centralised: bool, seed: int) -> list[str]:
    s = {**DATASETS[dataset], **(DP_SETTINGS.get(dataset, {}) if epsilon else {})}
    clients, steps = (1, s["local_steps"] * s["clients"]) if centralised else (s["clients"], s["local_steps"])
    out = COMMON + [f"data.dataset={dataset}", f"federation.clients={clients}",
                    f"federation.rounds={s['rounds']}", f"train.local_steps={steps}",
                    f"train.batch_size={s['batch_size']}", f"train.lr={s['lr']}", f"train.seed={seed}",
                    *s["extra"]]
    if epsilon:
        out += [f"privacy.target_epsilon={epsilon}", f"privacy.delta={DELTA}"]
    return out


def _drop_empty_evaluations(partition_id: int, reply):
    # With data.eval_fraction = 0 every client's own evaluation covers no
    # records, and Flower's weighted mean of their metrics divides by a zero
    # total; dropping those empty replies leaves the server's test split as the
    # only evaluation, which is what is reported anyway.
    if reply.metadata.message_type == "evaluate" and not reply.has_error():
        metrics = next(iter(reply.content.metric_records.values()), {})
        if not metrics.get("num-examples", 0):
            return None
    return reply


def _federate(overrides: list[str], work: Path) -> tuple[object, dict, float]:
    """Run one federation through the real apps; (config, metrics.json, seconds)."""
    return runner.federate(None, overrides, work, intercept=_drop_empty_evaluations)


def _summary(metrics: dict) -> dict:
    last = metrics["rounds"][-1]["eval"]
    privacy = metrics.get("privacy", {})
    clients = privacy.get("clients", {})
    return {"accuracy": last["accuracy"], "macro_f1": last["macro_f1"], "loss": last["loss"],
            "majority_baseline": last["majority_baseline"], "test_records": last["num_examples"],
            "accuracy_per_round": [r["eval"]["accuracy"] for r in metrics["rounds"]],
            "epsilon": privacy.get("max_client_epsilon", 0.0),
            "client_epsilons": {k: v["epsilon"] for k, v in clients.items()},
            "noise_multipliers": {k: v.get("noise_multiplier") for k, v in clients.items()},
            "sample_rates": {k: v.get("sample_rate") for k, v in clients.items()}}


def utility_worker(spec: dict, work: Path) -> dict:
    overrides = _overrides(spec["dataset"], epsilon=spec["epsilon"], centralised=spec["centralised"],
                           seed=spec["seed"])
    _, metrics, seconds = _federate(overrides, work)
    return {**spec, **_summary(metrics), "seconds": seconds, "overrides": overrides}


def _canaries(count: int, labels: list[str], rng: random.Random) -> list[dict]:
    """Unique random texts of pseudo-words, each with a random label: nothing to learn but themselves."""
    seen, out = set(), []
    while len(out) < count:
        text = " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))
                        for _ in range(10))
        if text not in seen:
            seen.add(text)
            out.append({"text": text, "label": rng.choice(labels)})
    return out


def _canary_losses(config, run_dir: Path, records: list[dict]) -> list[float]:
    """Each record's cross-entropy under the final global adapter."""
    import torch

    from fedcl.session import GlobalEvaluator

    evaluator = GlobalEvaluator(config)
    state = evaluator.load_saved(run_dir / "adapters" / f"round-{config.federation.rounds}")
    model, task = evaluator.shared.model, evaluator.shared.task
    evaluator.layout.load(model, state, evaluator.shared.initial_state, source="final global adapter")
    model.eval()
    with torch.no_grad():
        batch = task.encode([{**r, "meta": {}} for r in records])
        logits = task.logits(model, batch)
        return torch.nn.functional.cross_entropy(logits.float(), batch.targets, reduction="none").tolist()


def audit_worker(spec: dict, work: Path) -> dict:
    """Canaries into one client's file, the federation, then the membership test."""
    from fedcl import data
    from fedcl.config import load_config
    from fedcl.privacy.audit import audit_bound, max_provable_epsilon

    dataset, seed, m = spec["dataset"], spec["seed"], spec["canaries"]
    s = DATASETS[dataset]
    demo = data.load_dataset(load_config(None, [f"data.dataset={dataset}"]).data, seed=seed)
    rng = random.Random(f"canaries/{seed}")
    canaries = _canaries(2 * m, demo.labels, rng)
    inside, outside = canaries[:m], canaries[m:]
    # Each demo record goes to one site at random; every "in" canary to site-0.
    overrides = [o for o in _overrides(dataset, epsilon=spec["epsilon"], centralised=False, seed=seed)
                 if not o.startswith("data.dataset=")]
    overrides += runner.place_canaries(demo.train, demo.test, inside, s["clients"], rng, work)
    overrides += [f"data.labels={','.join(demo.labels)}", "data.classification_template=Review: {text}\nCondition:"]
    config = load_config(None, overrides)
    # The "in" canaries must be training records of exactly one client, and in no test split.
    split = data.load_dataset(config.data, seed=seed)
    texts = {c["text"] for c in inside}
    holders = {cid: sum(r["text"] in texts for r in data.client_split(config.data, split, cid, s["clients"],
                                                                         seed)[0])
               for cid in range(s["clients"])}
    holder = max(holders, key=holders.get)
    if holders[holder] != m or sum(holders.values()) != m or any(r["text"] in texts for r in split.test):
        raise RuntimeError(f"canaries misplaced: per client {holders}")
    config, metrics, seconds = _federate(overrides, work)
    loss_in = _canary_losses(config, work / "run", inside)
    loss_out = _canary_losses(config, work / "run", outside)
    delta = DELTA if spec["epsilon"] else 0.0
    bound = audit_bound([-x for x in loss_in], [-x for x in loss_out], alpha=spec["alpha"], delta=delta)
    summary = _summary(metrics)
    return {**spec, **summary, "seconds": seconds, "holder": holder,
            "holder_records": len(data.client_split(config.data, split, holder, s["clients"], seed)[0]),
            "holder_epsilon": summary["client_epsilons"].get(str(holder), 0.0),
            "bound": bound.to_dict(), "ceiling": max_provable_epsilon(m, m, alpha=spec["alpha"], delta=delta),
            "mean_loss_in": sum(loss_in) / m, "mean_loss_out": sum(loss_out) / m}


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fedcl-privacy-utility-") as tmp:
        return (audit_worker if spec["kind"] == "audit" else utility_worker)(spec, Path(tmp))


# -- the driver ---------------------------------------------------------------------

def _specs(seeds: int, datasets: list[str], audit: bool = True) -> list[dict]:
    specs = []
    for seed in range(seeds):
        for dataset in datasets:
            specs.append({"kind": "utility", "dataset": dataset, "condition": "federated", "epsilon": 0.0,
                          "centralised": False, "seed": seed})
            specs.append({"kind": "utility", "dataset": dataset, "condition": "centralised", "epsilon": 0.0,
                          "centralised": True, "seed": seed})
            for eps in EPSILONS:
                specs.append({"kind": "utility", "dataset": dataset, "condition": f"dp-eps{eps:g}",
                              "epsilon": eps, "centralised": False, "seed": seed})
    for eps in (0.0, AUDIT["epsilon"]) if audit else ():
        specs.append({"kind": "audit", "dataset": AUDIT["dataset"], "condition": f"audit-eps{eps:g}",
                      "epsilon": eps, "canaries": AUDIT["canaries"], "alpha": AUDIT["alpha"], "seed": 0})
    # The goal's pair first (epsilon 8 and its non-private federation), so a run cut short
    # still answers it; then the slow DP runs before the rest, so two workers finish together.
    goal = (lambda s: s["kind"] == "utility" and (s["epsilon"] == EPSILONS[-1] or s["condition"] == "federated"))
    return sorted(specs, key=lambda s: (not goal(s), s["epsilon"] == 0, s["kind"] != "audit"))


def _launch(spec: dict) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "bench.privacy_utility", "--worker", json.dumps(spec)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:  # one failed run is reported, not fatal to the others
        print(f"worker {spec} failed:\n{out.stderr[-3000:]}", flush=True)
        return {**spec, "error": out.stderr[-3000:]}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["wall_seconds"] = time.perf_counter() - started
    print(f"{row['dataset']} {row['condition']} seed {row['seed']}: acc {row['accuracy']:.3f} "
          f"f1 {row['macro_f1']:.3f} eps {row['epsilon']:.2f} ({row['wall_seconds']:.0f} s)", flush=True)
    return row


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    # the datasets of these rows (a result written under another profile may hold fewer)
    for dataset in dict.fromkeys(r["dataset"] for r in rows if r["kind"] == "utility"):
        conditions: dict[str, dict] = {}
        for row in (r for r in rows if r["kind"] == "utility" and r["dataset"] == dataset):
            conditions.setdefault(row["condition"], []).append(row)
        table = {}
        for name, group in conditions.items():
            table[name] = {key: _mean([g[key] for g in group]) for key in
                           ("accuracy", "macro_f1", "loss", "majority_baseline", "epsilon")}
            table[name]["seeds"] = len(group)
            table[name]["test_records"] = group[0]["test_records"]
        if "federated" not in table:  # a partial result: nothing to compare against yet
            out[dataset] = {"conditions": table, "goal_met": False}
            continue
        fed, fed_f1 = table["federated"]["accuracy"], table["federated"]["macro_f1"]
        for entry in table.values():
            entry["of_federated"] = entry["accuracy"] / fed if fed else 0.0
            entry["f1_of_federated"] = entry["macro_f1"] / fed_f1 if fed_f1 else 0.0
        dp8 = table.get(f"dp-eps{EPSILONS[-1]:g}", {})
        out[dataset] = {"conditions": table,
                        "goal_met": bool(dp8) and dp8["accuracy"] >= GOAL_FRACTION * fed,
                        "f1_goal_met": bool(dp8) and dp8["macro_f1"] >= GOAL_FRACTION * fed_f1}
    return out


def _settings() -> dict:
    return {name: {**s, "dp": {**s, **DP_SETTINGS.get(name, {})}} for name, s in DATASETS.items()}


# -- BENCHMARKS.md --------------------------------------------------------------------

_CLASSES = {"drugreview-condition": 4, "lending-club": 2}
_ORDER = ["centralised", "federated"] + [f"dp-eps{e:g}" for e in EPSILONS]
_NAMES = {"centralised": "centralised, no DP", "federated": "federated, no DP",
          **{f"dp-eps{e:g}": f"federated, DP target eps {e:g}" for e in EPSILONS}}


def _utility_lines(name: str, block: dict, settings: dict, measured: str = "") -> list[str]:
    rows = block["conditions"]
    fed = rows.get("federated")
    s = settings[name]
    dp = s.get("dp", s)
    any_row = next(iter(rows.values()))
    dp_text = ("DP the same" if _dp_same(s) else
               f"DP: expected (Poisson) batch {dp['batch_size']}, {dp['local_steps']} local steps, "
               f"lr {dp['lr']:g}")
    lines = [f"**{name}** ({s['clients']} clients, {s['rounds']} rounds x {s['local_steps']} local steps, "
             f"batch {s['batch_size']}, AdamW lr {s['lr']:g}; {dp_text}; centralised: 1 client, "
             f"{s['rounds']} x {s['clients'] * s['local_steps']} steps; "
             f"{any_row['test_records']} test records{' (stratified cap)' if _capped(s) else ''}; "
             f"majority baseline {any_row['majority_baseline']:.3f}"
             f"{'; measured ' + measured if measured else ''})", "",
             "| run | epsilon spent (max over clients) | accuracy | of non-DP federated | macro-F1 "
             "| of non-DP federated | test loss |",
             "|---|---|---|---|---|---|---|"]
    for key in _ORDER:
        if key in rows:
            r = rows[key]
            eps = f"{r['epsilon']:.2f}" if r["epsilon"] else "-"
            of = (lambda k: f"{100 * r[k]:.1f}%" if k in r else "-")
            lines.append(f"| {_NAMES[key]} | {eps} | {r['accuracy']:.3f} | {of('of_federated')} "
                         f"| {r['macro_f1']:.3f} | {of('f1_of_federated')} | {r['loss']:.3f} |")
    dp8 = rows.get(f"dp-eps{EPSILONS[-1]:g}")
    if not fed:
        return lines + ["", "The non-private federated run has not finished: no goal verdict yet.", ""]
    p, k = fed["majority_baseline"], _CLASSES[name]
    majority_f1 = 2 * p / (1 + p) / k  # always answering the majority class
    at_majority = (lambda r: r["accuracy"] <= r["majority_baseline"] + 0.01)
    if dp8:
        verdict = "met" if block["goal_met"] else "not met"
        if block["goal_met"] and at_majority(fed) and at_majority(dp8):
            verdict = "met, only vacuously"
        f1_verdict = "also at least" if block.get("f1_goal_met") else "below"
        if max(fed["macro_f1"], dp8["macro_f1"]) <= majority_f1 + 0.01:
            f1_verdict = "both at the majority class's score, so the ratio means nothing; formally"
            f1_verdict += " at least" if block.get("f1_goal_met") else " below"
        lines += ["", f"Goal at epsilon {EPSILONS[-1]:g} (accuracy >= {100 * GOAL_FRACTION:.0f}% of the non-private "
                  f"federated run's): {100 * dp8['of_federated']:.1f}%, **{verdict}**. Its macro-F1 is "
                  f"{dp8['macro_f1']:.3f} against {fed['macro_f1']:.3f} without DP "
                  f"({100 * dp8.get('f1_of_federated', 0.0):.1f}%, {f1_verdict} {100 * GOAL_FRACTION:.0f}%; "
                  f"always answering the majority class scores {majority_f1:.3f})."]
        if at_majority(fed) and at_majority(dp8):
            lines.append("Both the private and the non-private federation end at (or within a point of) the "
                         "majority baseline, so the accuracy goal is met only vacuously: neither learned to "
                         "tell the classes apart, and macro-F1 is the figure to read.")
            if k == 2 and 0 < p < 1:
                prior = -(p * math.log(p) + (1 - p) * math.log(1 - p))
                lines.append(f"Test loss says the same: answering the base rate ({p:.3f}) for every record "
                             f"scores {prior:.3f}; without DP the federation reaches {fed['loss']:.3f}, with "
                             f"DP at epsilon {EPSILONS[-1]:g} {dp8['loss']:.3f}.")
        elif at_majority(fed):
            lines.append(f"The non-private federation itself ends at (or within a point of) the majority "
                         f"baseline here, so the accuracy goal says little about what DP costs; macro-F1 is "
                         f"the figure to read (always answering the majority class scores {majority_f1:.3f}).")
        elif at_majority(dp8) and dp8["macro_f1"] <= majority_f1 + 0.02:
            lines.append("With DP the federation falls back to (about) always answering the majority class.")
    else:
        lines += ["", f"The epsilon {EPSILONS[-1]:g} run has not finished: no goal verdict yet."]
    return lines + [""]


def _dp_same(settings: dict) -> bool:
    dp = settings.get("dp", settings)
    return all(dp[k] == settings[k] for k in ("batch_size", "lr", "local_steps", "rounds"))


def _capped(settings: dict) -> bool:
    return any(e.startswith("data.max_test_records=") for e in settings.get("extra", []))


def render(result: dict) -> list[str]:
    seeds = result["seeds"]
    lines = [f"## Privacy against utility ({result['model']}, {seeds} seed{'s' if seeds > 1 else ''}, "
             f"measured {result['when']})", "",
             f"Final global accuracy and macro-F1 on the server's test split with sample-level DP-SGD at "
             f"target epsilon {', '.join(f'{e:g}' for e in result['epsilons'])} (delta {result['delta']:g}, "
             "RDP accountant, clip 1.0, noise calibrated once for the whole run), against the same "
             "federation without DP and against centralised training without DP. Centralised is one "
             "client holding every training record and taking clients x local steps per round, so it "
             "takes as many optimiser steps on as many examples as the federation's clients together. "
             "Every run is the real ServerApp and ClientApp driven in-process (tests/inprocess.py's "
             "InProcessGrid, no Ray), two runs at a time with one thread each, each with fresh ledgers.", "",
             f"**Model: `{result['model']}`**, " + (
                 "the pretrained SmolLM2-135M cut to its first 6 of 30 layers (`model.layers = 6`): it "
                 "learns the drug-review task within a few rounds at about a fifth of the full model's "
                 "step cost. "
                 if result["model"].startswith("smollm2") else
                 "a randomly initialised two-layer test model, not the 135M default: at about 3 s a step "
                 "on these 2 shared cores the real model cannot take the thousands of DP steps these runs "
                 "need. It learns weakly, so these figures show what DP costs relative to a weak learner, "
                 "not what a pretrained model reaches. ") +
             _dp_settings_text(result["settings"]) +
             (" Every run here subtracts the untuned model's label scores for an empty review from its "
              "label scores (`data.calibrate = true`), so training starts from no label preference "
              "instead of the base model's prior (all on \"Acne\", 13% of the test split)."
              if result["model"].endswith("calibrated") else "") +
             (" Each loan's text (about 196 tokens of field: value pairs) is cut to `model.max_length = 64` "
              "tokens: the model sees the amount, term, interest rate, sub-grade, state, verification status "
              "and part of the income." if "lending-club" in result["settings"] and
              result["model"].startswith("smollm2") else "") + " Clients keep "
             "no evaluation hold-out (`data.eval_fraction = 0`), so every record trains.", ""]
    # Tables come from the raw runs, so a render after a change here needs no re-run.
    utility = summarise(result["runs"])
    for name, block in utility.items():
        lines += _utility_lines(name, block, result["settings"], result.get("measured", {}).get(name, ""))
    flat = all(abs(r["accuracy"] - r["majority_baseline"]) <= 0.02
               for block in utility.values() for r in block["conditions"].values())
    if flat:
        lines += ["**What this run shows:** no run, private or not, ended more than 2 points from the "
                  "majority baseline, so the goal is met only vacuously: with this model the learner, not "
                  "DP, is the bottleneck. Measuring what DP really costs needs a model that learns these "
                  "tasks (the pretrained default) and the compute for it.", ""]
    lines += _audit_lines(result)
    if result.get("failed"):
        lines += [f"Runs that failed: {', '.join(r['condition'] + ' on ' + r['dataset'] for r in result['failed'])}.", ""]
    return lines


def _dp_settings_text(settings: dict) -> str:
    tuned = [name for name, s in settings.items() if not _dp_same(s)]
    same = [name for name in settings if name not in tuned]
    parts = []
    if same:
        parts.append(f"DP runs on {' and '.join(same)} use the non-private learning rate and batch size "
                     "(no DP-specific tuning was done).")
    if tuned:
        parts.append(f"DP runs on {' and '.join(tuned)} use one DP setting chosen up front (a larger expected "
                     "batch, a higher learning rate and fewer local steps, given with each table; no sweep).")
    return " ".join(parts)


def _audit_lines(result: dict) -> list[str]:
    audit = result["audit"]
    if not audit:
        return []
    a = result["audit_settings"]
    lines = [f"## Privacy audit with canaries ({result['model']}, measured "
             f"{result.get('audit_when', result['when'])})", "",
             f"{2 * a['canaries']} canaries (unique random pseudo-word texts, random labels) on "
             f"{a['dataset']}: {a['canaries']} written into one client's training file (checked to be "
             f"in its training split, in no test split), {a['canaries']} held out. After the federation "
             "(same settings as above) each canary is scored by minus the global model's loss on it; "
             "every threshold on the scores is a membership test, its TPR bounded from below and FPR "
             f"from above by one-sided Clopper-Pearson intervals ({100 * (1 - a['alpha']):.0f}% overall, "
             "alpha split over every threshold tried), and epsilon >= log((TPR - delta) / FPR) or "
             "log((1 - FPR - delta) / (1 - TPR)) (`fedcl/privacy/audit.py`).", "",
             "| run | epsilon accounted (canary client / max over clients) | epsilon lower bound | "
             "most these canaries could prove | mean loss in / out | bound <= accounted |",
             "|---|---|---|---|---|---|"]
    for r in sorted(audit, key=lambda r: r["epsilon"]):
        b = r["bound"]
        dp = r["epsilon"] > 0
        accounted = f"{r['holder_epsilon']:.2f} / {r['epsilon']:.2f}" if dp else "none (no DP)"
        ok = ("yes" if b["epsilon"] <= r["holder_epsilon"] + 1e-9 else "**no**") if dp else "-"
        lines.append(f"| {'DP, target eps ' + format(r['epsilon'], '.0f') if dp else 'no DP'} | {accounted} "
                     f"| {b['epsilon']:.2f} | {r['ceiling']:.2f} | {r['mean_loss_in']:.3f} / "
                     f"{r['mean_loss_out']:.3f} | {ok} |")
    lines += ["", f"Limited power: with {a['canaries']} canaries a side no outcome can prove more than the "
              "ceiling above, so the audit can catch an accounting that is far too optimistic at small "
              "epsilon, but cannot show that epsilon 8 is tight. A weak model that barely memorises "
              "anything also yields a bound near 0 without DP; the contrast row says how much this model "
              "memorises at all.", ""]
    return lines


def _result_path() -> Path:
    return RESULTS / RESULT_OF_PROFILE[PROFILE]


def _model_name() -> str:
    name = MODEL if PROFILE == "tiny" else f"{MODEL}, first {COMMON_LAYERS} layers"
    return name + (", label scores calibrated" if CALIBRATED else "")


def _saved(datasets: list[str], seeds: int) -> dict:
    """The saved result this invocation merges into: {} unless it runs a selection of the datasets."""
    if datasets == list(DATASETS) or not _result_path().exists():
        return {}
    old = json.loads(_result_path().read_text())
    if old.get("model") != _model_name() or old.get("seeds") != seeds:
        raise SystemExit(f"{_result_path()} holds {old.get('model')!r} with {old.get('seeds')} seed(s): "
                         "run every dataset instead of merging into it")
    return old


def _merged(rows: list[dict], datasets: list[str], seeds: int, audit: bool, started: float, old: dict) -> dict:
    """This invocation's rows; with a dataset selection, on top of `old`, the saved result's other datasets."""
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    model = _model_name()
    when = time.strftime("%Y-%m-%d %H:%M")
    kept = [r for r in old.get("runs", []) if r["dataset"] not in datasets]
    settings = {k: v for k, v in old.get("settings", {}).items() if k not in datasets}
    settings.update({k: v for k, v in _settings().items() if k in datasets})
    measured = {k: v for k, v in old.get("measured", {}).items() if k not in datasets}
    for name in dict.fromkeys(r["dataset"] for r in kept):
        measured.setdefault(name, old["when"])
    measured.update({name: when for name in datasets})
    runs = kept + [r for r in rows if r["kind"] == "utility"]
    return {"model": model, "when": when, "delta": DELTA, "epsilons": list(EPSILONS), "seeds": seeds,
            "settings": settings, "measured": measured, "audit_settings": AUDIT,
            "utility": summarise(runs),
            "audit": [r for r in rows if r["kind"] == "audit"] if audit else old.get("audit", []),
            "audit_when": when if audit else old.get("audit_when", old.get("when", when)),
            "runs": runs,
            "failed": [f for f in old.get("failed", []) if f["dataset"] not in datasets] + failed,
            "wall_seconds": {**(old.get("wall_seconds") if isinstance(old.get("wall_seconds"), dict)
                                else {name: old["wall_seconds"] for name in measured if name not in datasets
                                      and "wall_seconds" in old}),
                             **{name: time.perf_counter() - started for name in datasets}}}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--profile", choices=PROFILES, default="tiny")
    parser.add_argument("--datasets", default="",
                        help="comma-separated subset of the profile's datasets; their runs replace "
                             "theirs in the saved result, the other datasets' runs and the audit are kept")
    parser.add_argument("--no-audit", action="store_true", help="skip the canary audit (keep the saved one)")
    args = parser.parse_args()
    if args.profile != PROFILE:  # the module's settings are read at import: start again with it set
        os.environ["FEDCL_BENCH_PROFILE"] = args.profile
        os.execv(sys.executable, [sys.executable, "-m", "bench.privacy_utility", *sys.argv[1:]])
    datasets = [d for d in args.datasets.split(",") if d] or list(DATASETS)
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        parser.error(f"--datasets: {', '.join(unknown)} not in this profile's {', '.join(DATASETS)}")
    # A subset keeps the saved audit unless the audit's dataset is re-run.
    audit = not args.no_audit and AUDIT["dataset"] in datasets
    started = time.perf_counter()
    RESULTS.mkdir(exist_ok=True)
    old = _saved(datasets, args.seeds)  # read once, before this invocation rewrites the file
    rows: list[dict] = []
    # Written after every finished run, so an interrupted invocation leaves what it measured.
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in as_completed([pool.submit(_launch, spec) for spec in _specs(args.seeds, datasets, audit)]):
            rows.append(future.result())
            result = _merged(rows, datasets, args.seeds, audit, started, old)
            _result_path().write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["utility"], indent=2))


if __name__ == "__main__":
    main()
