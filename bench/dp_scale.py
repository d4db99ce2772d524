"""The DP recipe's model under audit and under a stream of tasks (issue 14).

    .venv/bin/python -m bench.dp_scale --rows audit-eps8,audit-nodp --parallel 2
    .venv/bin/python -m bench.dp_scale --rows naive-eps8,replay+ewc-eps8,joint-eps8 --parallel 2
    .venv/bin/python -m bench.dp_scale --quick --rows audit-eps8,naive-eps8   # the script itself

Every run is configs/dp-icd10.toml (SmolLM2-135M with its 30 layers, LoRA in the top
layer, 5 hospitals, 10,000 ICD-10-CM training records drawn with `train.seed`) driven
in one process (`fedcl.ops.run.run_inprocess`, clients one after another, one torch
thread), one subprocess per run, fresh run and state folders, so every privacy ledger
starts at zero.

- `audit-eps8`, `audit-nodp`: the canary audit. `CANARIES` unique texts of random
  pseudo-words, each with a random chapter, are added to hospital 0's training records
  ("in"); as many others are never trained on ("out"). After the run each canary is
  scored by minus its loss under the final global adapter, and `fedcl.privacy.audit`
  turns the best threshold's true and false positive rates into a lower bound on
  epsilon (Clopper-Pearson at alpha 0.05, Bonferroni over the thresholds). The hospitals
  keep no validation split here (`data.eval_fraction=0`), so every canary is trained on.
  The no-DP run shows what the same test finds when nothing bounds it.
- `naive-eps8`, `replay+ewc-eps8`, `joint-eps8` (and `-nodp`): continual learning under
  sample-level DP at epsilon 8 over the whole stream. The 21 chapters are cut into 3
  class-incremental tasks of about 3,300 records each (`TASKS`, balanced by record
  count), `ROUNDS_PER_TASK` rounds each; joint trains on all of them for the same rounds
  and its final adapter is scored on each task's test records.

Frozen states: the hidden states below the adapted layer are keyed by record, so a file
holding every record's states (`--pool`, made by bench/dp_recipe.py for the same seed) is
linked into each hospital's state folder before the run; without it round 1 builds them
(about 4 minutes per hospital on one core). Settings here were not tuned on any split:
they are the recipe's, with the changes named in each row's `overrides`. Results are
written after every run to bench/results/dp_scale.json, merged by (row, seed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from bench import runner
from fedcl import atomic, keys

RESULTS = Path(__file__).parent / "results"
RESULT = "dp_scale.json"
REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "dp-icd10.toml"
CACHE_FILE = "frozen-states.fedcl"
CLIENTS = 5
CANARIES = 100
ALPHA = 0.05
DELTA = 1e-5
# Three tasks of about a third of the records each (10,000 drawn with seed 1: 3,300, 3,438
# and 3,262): injury is 28% of the records alone, so it shares its task with four small
# chapters; the second task holds the next five largest; the third the eleven others.
TASKS = ("injury,blood,respiratory,newborn,symptom;"
         "musculoskeletal,eye,tumor,circulatory,factors;"
         "external,pregnancy,infection,skin,congenital,mental,digestive,urinary,endocrine,nervous,ear")
ROUNDS_PER_TASK = 2
# A task gives a hospital about 600 training records, a third of the recipe's 1,800, so the
# recipe's batch of 256 would sample 43% of them a step and need a noise multiplier of 5.2
# over its steps; batch 128 and 30 steps a round (180 DP steps a hospital over the stream)
# need 2.0, a noise std over the mean clipped gradient of 0.016 per trained number (the
# recipe's is 0.007).
CONTINUAL = [f"data.task_groups={TASKS}", f"continual.rounds_per_task={ROUNDS_PER_TASK}",
             "train.batch_size=128", "train.local_steps=30"]
METHODS = {"naive": ["continual.strategy=naive"], "replay+ewc": ["continual.strategy=replay+ewc"]}
PRIVACY = {"eps8": ["privacy.target_epsilon=8"], "nodp": ["privacy.target_epsilon=0"]}
ROWS = [f"{kind}-{p}" for kind in ("audit", *METHODS, "joint") for p in PRIVACY]
QUICK = ["model.name=tiny-llama", "data.max_records=400", "data.max_test_records=60", "federation.rounds=1",
         "train.local_steps=2", "train.batch_size=32", "train.micro_batch_size=16", "lora.top_layers=1",
         "continual.rounds_per_task=1"]


def _summary(metrics: dict) -> dict:
    rounds = metrics[keys.ROUNDS]
    privacy = metrics.get(keys.PRIVACY, {})
    return {"accuracy": rounds[-1][keys.EVAL][keys.ACCURACY], "macro_f1": rounds[-1][keys.EVAL][keys.MACRO_F1],
            "majority": rounds[-1][keys.EVAL][keys.MAJORITY],
            "accuracy_per_round": [r[keys.EVAL][keys.ACCURACY] for r in rounds],
            "round_seconds": [r.get(keys.ROUND_SECONDS) for r in rounds],
            "max_client_epsilon": privacy.get(keys.MAX_CLIENT_EPSILON, 0.0),
            "client_epsilons": {k: v[keys.EPSILON] for k, v in privacy.get(keys.CLIENTS, {}).items()}}


def _federate(overrides: list[str], work: Path):
    config, metrics, seconds = runner.federate(CONFIG, overrides, work)
    return config, metrics, round(seconds, 1)


def audit_worker(spec: dict, base: list[str], work: Path) -> dict:
    """Canaries into hospital 0's file, the federation, then the membership test."""
    from bench.privacy_utility import _canaries, _canary_losses
    from fedcl import data
    from fedcl.config import load_config
    from fedcl.demo_data import classification_template
    from fedcl.privacy.audit import audit_bound, max_provable_epsilon

    seed, m = spec["seed"], spec.get("canaries", CANARIES)
    source = load_config(CONFIG, base).data
    demo = data.load_dataset(source, seed=seed)
    rng = random.Random(f"canaries/{seed}")
    canaries = _canaries(2 * m, demo.labels, rng)
    inside, outside = canaries[:m], canaries[m:]
    overrides = base + runner.place_canaries(demo.train, demo.test, inside, CLIENTS, rng, work) + [
        f"data.labels={','.join(demo.labels)}", f"data.classification_template={classification_template(source)}",
        "data.max_records=0", "data.max_test_records=0", "data.eval_fraction=0"]
    config = load_config(CONFIG, overrides)
    split = data.load_dataset(config.data, seed=seed)
    texts = {c["text"] for c in inside}
    trained = [data.client_split(config.data, split, cid, CLIENTS, seed)[0] for cid in range(CLIENTS)]
    holders = [sum(r["text"] in texts for r in part) for part in trained]
    if holders[0] != m or sum(holders) != m or any(r["text"] in texts for r in split.test):
        raise RuntimeError(f"canaries misplaced: trained on per hospital {holders}")
    config, metrics, seconds = _federate(overrides, work)
    loss_in = _canary_losses(config, work / "run", inside)
    loss_out = _canary_losses(config, work / "run", outside)
    delta = DELTA if config.privacy.target_epsilon else 0.0
    bound = audit_bound([-x for x in loss_in], [-x for x in loss_out], alpha=ALPHA, delta=delta)
    summary = _summary(metrics)
    return {**summary, "overrides": overrides, "seconds": seconds, "canaries": m,
            "holder_records": len(trained[0]), "holder_epsilon": summary["client_epsilons"].get("0", 0.0),
            "bound": bound.to_dict(), "ceiling": max_provable_epsilon(m, m, alpha=ALPHA, delta=delta),
            "mean_loss_in": sum(loss_in) / m, "mean_loss_out": sum(loss_out) / m}


def continual_worker(spec: dict, base: list[str], work: Path) -> dict:
    """One continual run of a method, or joint training on every task with the same rounds."""
    from collections import Counter

    from fedcl.config import load_config
    from fedcl.continual.schedule import build_stream
    from fedcl.rundir import RunDir
    from fedcl.session import GlobalEvaluator

    kind = spec["row"].rsplit("-", 1)[0]
    stream_config = load_config(CONFIG, base + CONTINUAL)
    tasks = build_stream(stream_config.data, stream_config.train.seed)
    facts = {"train_records": [len(t.train_records) for t in tasks],
             "test_records": [len(t.test_records) for t in tasks],
             "test_majority_share": [Counter(r["label"] for r in t.test_records).most_common(1)[0][1]
                                     / len(t.test_records) for t in tasks]}
    rounds = len(tasks) * stream_config.continual.rounds_per_task
    if kind == "joint":
        overrides = base + CONTINUAL + ["data.task_groups=", f"federation.rounds={rounds}"]
        config, metrics, seconds = _federate(overrides, work)
        evaluator = GlobalEvaluator(config)
        state = evaluator.load_saved(RunDir(work / "run").adapter_dir(rounds))
        accuracies = [float(evaluator.evaluate_records(state, t.test_records)["accuracy"]) for t in tasks]
        return {**_summary(metrics), **facts, "overrides": overrides, "seconds": seconds, "rounds": rounds,
                "task_accuracies": accuracies, "average_accuracy": sum(accuracies) / len(accuracies)}
    overrides = base + CONTINUAL + METHODS[kind]
    config, metrics, seconds = _federate(overrides, work)
    section = metrics["continual"]
    return {**_summary(metrics), **facts, "overrides": overrides, "seconds": seconds, "rounds": rounds,
            **{k: section[k] for k in ("accuracy_matrix", "average_accuracy", "forgetting", "bwt")}}


def worker(spec: dict, work: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    base = [f"train.seed={spec['seed']}", *PRIVACY[spec["row"].rsplit("-", 1)[1]], *(QUICK if spec.get("quick") else [])]
    run = audit_worker if spec["row"].startswith("audit") else continual_worker
    return {**spec, **run(spec, base, work)}


def _link_pool(pool: Path | None, state: Path) -> bool:
    """Every hospital's state folder gets the pool's states (a hard link: a hospital that adds
    records writes a new file in its place, leaving the pool as it was)."""
    if pool is None or not pool.exists():
        return False
    for client in range(CLIENTS):
        folder = state / f"client-{client}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.link(pool, folder / CACHE_FILE)
        except OSError:
            shutil.copy2(pool, folder / CACHE_FILE)
    return True


def run_one(spec: dict, root: Path, pool: Path | None) -> dict:
    work = root / f"{spec['row']}-seed{spec['seed']}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "state").mkdir(parents=True)
    seeded = _link_pool(None if spec.get("quick") else pool, work / "state")
    result = runner.run_worker("bench.dp_scale", spec, work)
    if "error" in result:
        return result
    return {**result, "seeded_cache": seeded, "load_after": os.getloadavg()[0]}


def save(rows: list[dict]) -> None:
    path = RESULTS / RESULT
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    merged = {(r["row"], r["seed"]): r for r in old["rows"]}
    merged.update({(r["row"], r["seed"]): r for r in rows if "error" not in r})
    atomic.write_json(path, {"how": __doc__.split("\n\n")[1].strip(), "rows": list(merged.values())})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="audit-eps8", help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--root", default="/tmp/fedcl-dp-scale", help="run folders")
    ap.add_argument("--pool", default="/work/runs/dp-recipe/pool/icd10/merged.fedcl",
                    help="a frozen-states file holding every record's states (bench/dp_recipe.py makes one)")
    ap.add_argument("--quick", action="store_true", help="check the script: tiny model, results not saved")
    runner.add_worker_flags(ap)
    args = ap.parse_args()
    if runner.serve_worker(args, worker):
        return 0
    rows = runner.parse_rows(ap, args.rows, ROWS)
    pool = Path(args.pool)
    if not args.quick and not pool.exists():
        print(f"--pool {pool}: not found; round 1 of every run builds its hospitals' states", flush=True)
    specs = [{"row": r, "seed": int(s), **({"quick": True} if args.quick else {})}
             for s in args.seeds.split(",") for r in rows]
    done = []
    with ThreadPoolExecutor(max_workers=args.parallel) as workers:
        futures = [workers.submit(run_one, spec, Path(args.root), pool) for spec in specs]
        for future in as_completed(futures):
            result = future.result()
            done.append(result)
            if not args.quick:
                save(done)
            print(json.dumps({k: result.get(k) for k in ("row", "seed", "accuracy", "average_accuracy", "forgetting",
                                                         "max_client_epsilon", "bound", "seconds", "error")}),
                  flush=True)
    return 0 if all("error" not in r for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
