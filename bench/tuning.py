"""Tuning benchmark (issue 7): best accuracy found by grid, random and TPE after
the same number of trials, over several sampler seeds, and the privacy-utility
Pareto front of a multi-objective study with DP on (epsilon up to 8).

    .venv/bin/python -m bench.tuning [--quick]

Every study is `fedcl.ops.tuning.run_study`, the function behind `fedcl tune`, with
its own samplers, search space parsing and objective (final-round accuracy on
the medical demo's global test split). Only the runner differs: each trial's
federation runs through the real ServerApp, strategy and ClientApp in this
process (`fedcl.ops.run.run_inprocess`) instead of on Flower's Ray engine, because an
engine trial took 60-80 s here against 14 s in-process for the same run (8
rounds x 20 steps), and the budget is ~50 trials in about 25 minutes.
Studies and run folders live in a temporary directory. Writes
bench/results/tuning.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RESULT = "tuning.json"

# tiny-llama, not the default smollm2-135m: a training step of the 135M model
# costs ~3 s here, so one trial would take minutes. tiny-llama is randomly
# initialised and learns this task only weakly (majority class 0.559; a few
# records above it at best).
BASE = ["model.name=tiny-llama", "data.dataset=drugreview-condition", "federation.clients=3",
        "federation.rounds=3", "train.batch_size=8", "train.seed=0"]
# random and TPE search lr on a continuous log scale; the grid needs discrete
# values, so it gets the same range as four log-spaced points.
SPACE = {
    "train.lr": {"low": 1e-3, "high": 3e-2, "log": True},
    "train.local_steps": {"low": 5, "high": 15, "step": 5},
    "lora.r": {"choices": [4, 8, 16]},
}
GRID_SPACE = {**SPACE, "train.lr": {"choices": [1e-3, 3e-3, 1e-2, 3e-2]}}
# The front: target_epsilon is tuned with the training knobs; DP calibrates the
# noise up front to spend that epsilon over the planned rounds (delta 1e-5).
DP_SPACE = {
    "privacy.target_epsilon": {"low": 0.5, "high": 8.0, "log": True},
    "train.lr": {"low": 1e-3, "high": 3e-2, "log": True},
    "train.local_steps": {"low": 5, "high": 15, "step": 5},
}
# DP on in the base config; every trial sets its own target_epsilon from the space.
DP_BASE = ["privacy.delta=1e-5", "privacy.target_epsilon=8"]
SAMPLERS = ("grid", "random", "tpe")



def trial_rows(study) -> list[dict]:
    import optuna

    rows = []
    for t in study.trials:
        row = {"number": t.number, "state": t.state.name, "params": t.params,
               "epsilon": t.user_attrs.get("epsilon"),
               "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
               if t.datetime_complete else None}
        if t.state == optuna.trial.TrialState.COMPLETE:
            row["values"] = list(t.values)
        rows.append(row)
    return rows


def best_so_far(rows: list[dict]) -> list[float]:
    curve, best = [], float("-inf")
    for row in rows:
        if "values" in row:
            best = max(best, row["values"][0])
        curve.append(best)
    return curve


def run_one(overrides: list[str], space_table: dict, out: Path, **options) -> tuple[list[dict], object]:
    """One study through `run_study`: its trial rows, and the study itself."""
    from fedcl.config import load_config
    from fedcl.ops.run import run_inprocess
    from fedcl.ops.tuning import TuneOptions, parse_space, run_study

    base = load_config(None, overrides)
    study = run_study(base, parse_space(space_table, base), out, TuneOptions(**options),
                      runner=run_inprocess)
    return trial_rows(study), study


def compare_samplers(tmp: Path, trials: int, seeds: list[int], save) -> dict:
    """Seed by seed across samplers, saving after every study, so a cut-short run
    still compares the samplers on the seeds it finished."""
    runs: dict[str, list] = {sampler: [] for sampler in SAMPLERS}
    for seed in seeds:
        for sampler in SAMPLERS:
            start = time.time()
            # No pruner: every trial runs all its rounds, so trial counts compare alike.
            rows, _ = run_one(BASE, GRID_SPACE if sampler == "grid" else SPACE,
                              tmp / f"{sampler}-{seed}", trials=trials, sampler=sampler,
                              seed=seed, pruner="none")
            runs[sampler].append({"seed": seed, "trials": rows, "best_so_far": best_so_far(rows),
                                  "seconds": time.time() - start})
            print(f"bench: {sampler} seed {seed}: best {runs[sampler][-1]['best_so_far'][-1]:.4f}",
                  flush=True)
        save(runs)
    return runs


def pareto(tmp: Path, trials: int, seed: int) -> dict:
    start = time.time()
    rows, study = run_one(BASE + DP_BASE, DP_SPACE, tmp / "pareto", trials=trials, sampler="tpe",
                          seed=seed, multi_objective=True, pruner="none")
    front = sorted(({"number": t.number, "accuracy": t.values[0], "epsilon": t.values[1],
                     "params": t.params} for t in study.best_trials), key=lambda p: p["epsilon"])
    return {"sampler": "tpe", "seed": seed, "trials": rows, "front": front,
            "seconds": time.time() - start}


# -- rendering -----------------------------------------------------------------------------
def _settings(params: dict) -> str:
    names = {"privacy.target_epsilon": "target eps", "train.lr": "lr", "train.local_steps": "steps",
             "lora.r": "r"}
    return ", ".join(f"{names.get(k, k)} {v:.3g}" if isinstance(v, float) else f"{names.get(k, k)} {v}"
                     for k, v in params.items())


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _same_trials(a: dict, b: dict) -> str:
    """Whether two studies ran the same settings in the same order, and scored them alike."""
    if [t["params"] for t in a["trials"]] != [t["params"] for t in b["trials"]]:
        return "no"
    alike = [t.get("values") for t in a["trials"]] == [t.get("values") for t in b["trials"]]
    return "yes, with the same accuracies" if alike else "yes, but different accuracies"


def _repeats(runs: dict) -> str:
    """How often the same settings, run twice (TPE's random start repeats random search),
    gave the same accuracy."""
    pairs = [(t["params"], t["values"][0], x["values"][0])
             for a, b in zip(runs["tpe"], runs["random"]) for t, x in zip(a["trials"], b["trials"])
             if t["params"] == x["params"] and "values" in t and "values" in x]
    if not pairs:
        return "no settings ran twice."
    differ = [p for p in pairs if p[1] != p[2]]
    text = (f"{len(pairs)} trials ran the same settings twice (TPE and random search at the same "
            f"seed); {len(pairs) - len(differ)} gave identical accuracies")
    if not differ:
        return text + "."
    cases = "; ".join(f"lr {p['train.lr']:.3g}, steps {p['train.local_steps']}: {a:.3f} vs {b:.3f}"
                      for p, a, b in differ)
    return (text + f", {len(differ)} did not ({cases}). Training at the larger learning rates "
            "is close to diverging here, where small floating-point differences between runs in "
            "one long process may grow; the cause was not investigated further.")


def _sampler_lines(r: dict) -> list[str]:
    runs, trials = r["samplers"], r["trials_per_study"]
    seeds = ", ".join(str(s["seed"]) for s in runs["tpe"])
    counts = [c for c in sorted({1, 2, 4, 8, trials, *range(trials // 4, trials + 1, max(1, trials // 4))})
              if 1 <= c <= trials]
    lines = [
        f"Best final-round test accuracy found after n trials on the medical demo "
        f"(`drugreview-condition`, 4 classes, 136 test records, majority class "
        f"{r['majority_baseline']:.3f}), mean over sampler seeds {seeds} with min-max in brackets. "
        f"Each study is `fedcl tune`'s `run_study` with {trials} trials, no pruner.", "",
        "| sampler | " + " | ".join(f"n = {c}" for c in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for sampler, studies in runs.items():
        cells = [_spread([s["best_so_far"][c - 1] for s in studies]) for c in counts]
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    planned = r.get("seeds_planned", [])
    if len(runs["tpe"]) < len(planned):
        lines += ["", f"This run finished {len(runs['tpe'])} of the {len(planned)} planned seeds "
                  f"({', '.join(map(str, planned))}) before it was stopped; the table covers those."]
    lines += ["", "Final best per sampler and seed, with the settings that reached it:", "",
              "| sampler | seed | best accuracy | settings | study wall time |", "|---|---|---|---|---|"]
    for sampler, studies in runs.items():
        for s in studies:
            top = max((t for t in s["trials"] if "values" in t), key=lambda t: t["values"][0])
            lines.append(f"| {sampler} | {s['seed']} | {top['values'][0]:.3f} | {_settings(top['params'])} "
                         f"| {s['seconds']:.0f} s |")
    every = [t["values"][0] for studies in runs.values() for s in studies for t in s["trials"] if "values" in t]
    return lines + [
        "", f"All {len(every)} sampler-comparison trials together scored {min(every):.3f} to "
        f"{max(every):.3f} (median {statistics.median(every):.3f}); "
        f"{sum(v > r['majority_baseline'] for v in every)} of them beat the majority class. "
        f"One test record is {1 / 136:.4f} of accuracy.", ""]


def _front_lines(r: dict) -> list[str]:
    p, majority = r["pareto"], r["majority_baseline"]
    done = [t for t in p["trials"] if "values" in t]
    lines = [
        f"Pareto front of a multi-objective study (TPE, seed {p['seed']}, {len(done)} completed trials; "
        f"maximise accuracy, minimise epsilon; sample-level DP-SGD with `privacy.target_epsilon` "
        f"tuned in 0.5-8, delta 1e-5). Epsilon is the most any client spent, from its ledger:", "",
        "| trial | epsilon spent | accuracy | settings |", "|---|---|---|---|",
    ]
    for point in p["front"]:
        lines.append(f"| {point['number']} | {point['epsilon']:.2f} | {point['accuracy']:.3f} "
                     f"| {_settings(point['params'])} |")
    accuracies = [t["values"][0] for t in done]
    targets = [t["params"]["privacy.target_epsilon"] for t in done]
    verdict = ("" if any(v > majority for v in accuracies) else
               " No DP trial beat the majority class, so with this model and budget the front "
               "shows what the DP noise costs (accuracy below the majority class at the smaller "
               "epsilons), not a private model worth deploying.")
    return lines + [
        "", f"All {len(done)} DP trials scored {min(accuracies):.3f} to {max(accuracies):.3f}, "
        f"{sum(v > majority for v in accuracies)} of them above the majority class "
        f"{majority:.3f}; TPE drew target epsilons from {min(targets):.2f} to "
        f"{max(targets):.2f} of the 0.5-8 range (study wall time {p['seconds']:.0f} s).{verdict}", ""]


def _notes(r: dict) -> list[str]:
    runs, trials = r["samplers"], r["trials_per_study"]
    rounds = next(x.split("=")[1] for x in r["base"] if x.startswith("federation.rounds="))
    steps, lr_grid = r["space"]["train.local_steps"], r["grid_space"]["train.lr"]["choices"]
    grid_size = len(lr_grid) * len(r["grid_space"]["lora.r"]["choices"]) * (
        (steps["high"] - steps["low"]) // steps["step"] + 1)
    best = max(t["values"][0] for studies in runs.values() for x in studies for t in x["trials"]
               if "values" in t)
    above = round((best - r["majority_baseline"]) * 136)
    total = sum(len(x["trials"]) for studies in runs.values() for x in studies) + len(r["pareto"]["trials"])
    guided = (f"with {trials} trials none of TPE's trials is model-guided" if trials <= 10 else
              f"with {trials} trials the last {trials - 10} of each TPE study are model-guided")
    same = ", ".join(f"seed {t['seed']} {_same_trials(t, x)}" for t, x in zip(runs["tpe"], runs["random"]))
    return [
        "How measured and what to make of it:", "",
        f"- Trials are real federated runs (3 clients, {rounds} rounds, the real ServerApp, FedAvg strategy "
        "and ClientApp, DP-SGD and its accountant when on) driven in-process by "
        "`tests/inprocess.py`, not on Flower's Ray engine: while this benchmark was written, one "
        "trial of 8 rounds x 20 local steps took 59-83 s on the engine (Ray kept up between "
        "trials, as `fedcl tune` does) against 14 s in-process, which would have put this "
        "budget far past the time limit. The search itself is `fedcl tune`'s: `run_study`, "
        "`parse_space`, its samplers and objective. The same settings gave 0.551 on the engine "
        "and 0.566 in-process in that check (two test records apart; the cause was not "
        "investigated here), so figures here are for the in-process runner.",
        "- Model: `tiny-llama`, not the default `smollm2-135m` (about 3 s per training step "
        "here, minutes per trial). tiny-llama is randomly initialised and learns this task "
        f"weakly: the best trial here is {above} test record(s) past the majority class, and a "
        "too-large lr falls far below it. Differences between samplers of one or two records "
        "are not evidence for either.",
        f"- The whole benchmark (all studies, {total} trials) took {r['total_seconds'] / 60:.0f} "
        "minutes on 2 cores shared with other work.",
        f"- Space: `train.lr` 1e-3-3e-2 (log), `train.local_steps` {steps['low']}-{steps['high']} "
        f"(step {steps['step']}), `lora.r` 4/8/16. Random and TPE sample lr continuously; the grid "
        f"({grid_size} points) takes lr from {', '.join(f'{v:g}' for v in lr_grid)} and visits its "
        f"points in an order shuffled by the seed, so {trials} trials see {trials} of {grid_size}.",
        f"- Optuna's TPE draws its first 10 trials at random (`n_startup_trials`, default 10, "
        f"which `fedcl tune` keeps), with a random sampler seeded like `--sampler random`; "
        f"{guided}. Same trials as random search at the same seed: {same}. A longer budget "
        "would be needed to see TPE's model at work; this one was set by a ~25 minute "
        "wall-time limit on a shared 2-core machine.",
        f"- Reproducibility: {_repeats(runs)} The spread over seeds is mostly the samplers' "
        "own, and the final-round accuracy of this model also moves by several records from "
        "round to round, which the objective inherits.",
    ]


def render(r: dict) -> list[str]:
    return ([f"## Tuning: samplers and the privacy-utility front (tiny-llama, measured {r['when']})", ""]
            + _sampler_lines(r) + _front_lines(r) + _notes(r) + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 trials, 1 seed: for checking the script")
    args = parser.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the per-round lines of fedcl stay
    trials, seeds, dp_trials = (2, [0], 2) if args.quick else (5, [0, 1, 2], 6)
    start = time.time()
    result: dict = {"model": "tiny-llama", "when": time.strftime("%Y-%m-%d %H:%M"), "base": BASE,
                    "space": SPACE, "grid_space": GRID_SPACE, "dp_space": DP_SPACE, "dp_base": DP_BASE,
                    "runner": "in-process (fedcl.ops.run.run_inprocess)", "trials_per_study": trials}

    def save(runs: dict | None = None) -> None:
        if runs is not None:
            result["samplers"] = runs
        result["total_seconds"] = time.time() - start
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / RESULT).write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="fedcl-bench-tuning-") as tmp:
        # The front first: it is one study, and the sampler comparison saves as it goes.
        result["pareto"] = pareto(Path(tmp), dp_trials, seed=0)
        from fedcl.rundir import RunDir

        first = Path(tmp) / "pareto" / "trials" / "trial-0"
        result["majority_baseline"] = RunDir(first).metrics()["rounds"][-1]["eval"]["majority_baseline"]
        result["seeds_planned"] = seeds
        compare_samplers(Path(tmp), trials, seeds, save)
    save()
    print("\n".join(render(result)))


if __name__ == "__main__":
    main()
