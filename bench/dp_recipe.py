"""The DP recipe at institution scale: configs/dp-icd10.toml and configs/dp-cfpb.toml against
the same federation without DP, at other epsilons, non-IID and centralised (issue 14).

    .venv/bin/python -m bench.dp_recipe --dataset icd10 --rows nodp,eps3
    .venv/bin/python -m bench.dp_recipe --dataset cfpb --rows nodp --parallel 1
    .venv/bin/python -m bench.dp_recipe --dataset icd10 --rows eps8 --seeds 0,1
    .venv/bin/python -m bench.dp_recipe --quick --rows nodp,eps8   # the script itself, tiny model
    .venv/bin/python -m bench.dp_recipe --rows eps8 --set train.lr=2e-2 --tag lr2e-2   # another setting

Every row is the shipped recipe (5 clients, SmolLM2-135M with its 30 layers, LoRA in the
top layer, logical batch 256, 60 steps x 5 rounds, each client's validation split held out
of its training records) with one change, named in the row's `overrides`:

- `nodp`: privacy off; the same batch, steps and learning rate (so the same compute);
- `eps1`, `eps3`, `eps8`: sample-level DP-SGD at that epsilon over the whole run;
- `dirichlet-nodp`, `dirichlet-eps8`: labels split Dirichlet(0.5) over the clients;
- `central-nodp`: one client holding every training record, 5 x the steps a round (the
  federation's optimiser steps and examples together).

Each run is the real ServerApp and ClientApp driven in one process (`fedcl.ops.run.
run_inprocess`, clients one after another, one torch thread), one subprocess per run,
`--parallel` at a time; every run has fresh run and state folders, so every privacy
ledger starts at zero. Building the frozen layers' states of every record costs the
first run of a partition most of its time (about 4 minutes per ICD client on one
core): the rows of one partition (same clients, split and seed) share them, copied
from the first finished run's node state folders (`frozen-states.fedcl`, checked by
its fingerprint) into each later run's; a row's `seeded_cache` says whether it had
them. Learning rate and steps: the recipe's, chosen on the validation figures of
`--set`/`--tag` rows (BENCHMARKS.md), never on the test split. Results are written after every run to
bench/results/dp_recipe.json, merged by (dataset, row, seed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from bench import runner
from fedcl import atomic, keys

RESULTS = Path(__file__).parent / "results"
RESULT = "dp_recipe.json"
REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"icd10": ("configs/dp-icd10.toml", "icd10-chapters"),
           "cfpb": ("configs/dp-cfpb.toml", "cfpb-complaints")}
CLIENTS = 5
ROWS = {
    "nodp": ["privacy.target_epsilon=0"],
    "eps1": ["privacy.target_epsilon=1"],
    "eps3": ["privacy.target_epsilon=3"],
    "eps8": ["privacy.target_epsilon=8"],
    "dirichlet-nodp": ["privacy.target_epsilon=0", "data.partition=dirichlet", "data.alpha=0.5"],
    "dirichlet-eps8": ["privacy.target_epsilon=8", "data.partition=dirichlet", "data.alpha=0.5"],
    "central-nodp": ["privacy.target_epsilon=0", "federation.clients=1"],  # + CLIENTS x the local steps
}
CACHE_FILE = "frozen-states.fedcl"
# --quick: the script itself checked in a minute (tiny model, few records, one round).
QUICK = ["model.name=tiny-llama", "data.max_records=300", "data.max_test_records=40", "federation.rounds=1",
         "train.local_steps=2", "train.batch_size=32", "train.micro_batch_size=16", "lora.top_layers=1"]


def partition_of(row: str, seed: int) -> str:
    """Rows with the same clients' records share their frozen states."""
    kind = "central" if row.startswith("central") else "dirichlet" if row.startswith("dirichlet") else "iid"
    return f"{kind}-seed{seed}"


def worker(spec: dict, work: Path) -> dict:
    """One federation in this process; its summary."""
    import torch

    from fedcl.config import load_config

    torch.set_num_threads(1)
    config_file, dataset = CONFIGS[spec["dataset"]]
    overrides = [f"data.dataset={dataset}", f"train.seed={spec['seed']}", *ROWS[spec["row"]],
                 *spec.get("extra", []), *(QUICK if spec.get("quick") else [])]
    if spec["row"].startswith("central"):  # the federation's optimiser steps, on one client
        steps = load_config(REPO / config_file, overrides).train.local_steps
        overrides.append(f"train.local_steps={CLIENTS * steps}")
    _, metrics, seconds = runner.federate(REPO / config_file, overrides, work)
    rounds = metrics[keys.ROUNDS]
    last, privacy = rounds[-1], metrics.get(keys.PRIVACY, {})
    return {**spec, "config": config_file, "overrides": overrides, "seconds": round(seconds, 1),
            "accuracy": last[keys.EVAL][keys.ACCURACY], "macro_f1": last[keys.EVAL][keys.MACRO_F1],
            "majority": last[keys.EVAL][keys.MAJORITY], "test_records": last[keys.EVAL][keys.NUM_EXAMPLES],
            "initial_accuracy": metrics.get(keys.INITIAL_EVAL, {}).get(keys.ACCURACY),
            "accuracy_per_round": [r[keys.EVAL][keys.ACCURACY] for r in rounds],
            "validation_accuracy": last.get(keys.FEDERATED_EVAL, {}).get(keys.ACCURACY),
            "validation_macro_f1": last.get(keys.FEDERATED_EVAL, {}).get(keys.MACRO_F1),
            "validation_accuracy_per_round": [r.get(keys.FEDERATED_EVAL, {}).get(keys.ACCURACY) for r in rounds],
            "round_seconds": [r.get(keys.ROUND_SECONDS) for r in rounds],
            "max_client_epsilon": privacy.get(keys.MAX_CLIENT_EPSILON, 0.0),
            "client_epsilons": {k: v[keys.EPSILON] for k, v in privacy.get(keys.CLIENTS, {}).items()}}


def _seed_cache(root: Path, partition: str, state: Path, clients: int) -> str | bool:
    """Give the run's node folders frozen states made earlier: the same partition's files
    ("own"), else every record's states merged from another partition's ("merged": the
    states are keyed by record, so any split of the same records finds its own)."""
    own = sorted((root / partition).glob(f"client-*/{CACHE_FILE}"))
    for f in own:
        (state / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, state / f.parent.name / CACHE_FILE)
    if own:
        return "own"
    merged = _merged(root)
    if merged is None:
        return False
    for client in range(clients):
        (state / f"client-{client}").mkdir(parents=True, exist_ok=True)
        shutil.copy2(merged, state / f"client-{client}" / CACHE_FILE)
    return "merged"


def _merged(root: Path) -> Path | None:
    """One file with the states of every record in the dataset's pool (built once)."""
    import torch

    from fedcl.frozen import read_states, write_states

    merged = root / "merged.fedcl"
    files = sorted(root.glob(f"*/client-*/{CACHE_FILE}"))
    if merged.exists() or not files:
        return merged if merged.exists() else None
    blob = files[0].read_bytes()
    payload = blob.split(b"\n", 2)[2]  # after the magic line and the checksum line
    fingerprint = torch.load(io.BytesIO(payload), weights_only=True)["fingerprint"]
    states: dict = {}
    for f in files:
        found = read_states(f, fingerprint)
        if not found:
            raise RuntimeError(f"{f}: not readable under the pool's fingerprint; remove the pool ({root})")
        states.update(found)
    write_states(merged, fingerprint, states)
    return merged


def _keep_cache(state: Path, pool: Path) -> None:
    if any(pool.glob(f"client-*/{CACHE_FILE}")):
        return
    for f in state.glob(f"client-*/{CACHE_FILE}"):
        (pool / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, pool / f.parent.name / CACHE_FILE)


def row_name(spec: dict) -> str:
    """The row, with its `--tag` when it was run with other settings (`--set`)."""
    return spec["row"] + (f"-{spec['tag']}" if spec.get("tag") else "")


def run_one(spec: dict, root: Path) -> dict:
    work = root / f"{spec['dataset']}-{row_name(spec)}-seed{spec['seed']}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "state").mkdir(parents=True)
    pools = root / "pool" / spec["dataset"]
    pool = pools / partition_of(spec["row"], spec["seed"])
    clients = 1 if spec["row"].startswith("central") else CLIENTS
    seeded = _seed_cache(pools, pool.name, work / "state", clients)
    result = runner.run_worker("bench.dp_recipe", spec, work)
    if "error" in result:
        return result
    _keep_cache(work / "state", pool)
    return {**result, "seeded_cache": seeded, "load_after": os.getloadavg()[0]}


def save(rows: list[dict]) -> None:
    path = RESULTS / RESULT
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    key = lambda r: (r["dataset"], row_name(r), r["seed"])  # noqa: E731
    merged = {key(r): r for r in old["rows"]}
    merged.update({key(r): r for r in rows})
    atomic.write_json(path, {"how": __doc__.split("\n\n")[2].strip(), "rows": list(merged.values())})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(CONFIGS), default="icd10")
    ap.add_argument("--rows", default="nodp,eps8", help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--root", default="/tmp/fedcl-dp-recipe", help="run folders and the shared states")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another setting for every row (e.g. train.lr=2e-2); needs --tag")
    ap.add_argument("--tag", default="", help="names the --set rows in the results (e.g. lr2e-2)")
    ap.add_argument("--quick", action="store_true", help="check the script: tiny model, results not saved")
    runner.add_worker_flags(ap)
    args = ap.parse_args()
    if runner.serve_worker(args, worker):
        return 0
    rows = runner.parse_rows(ap, args.rows, ROWS)
    if bool(args.set) != bool(args.tag):
        ap.error("--set and --tag go together: the tag names the rows run with other settings")
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        ap.error(f"--set {bad[0]!r}: expected KEY=VALUE, e.g. train.lr=2e-2")
    extra = {"extra": args.set, "tag": args.tag} if args.set else {}
    specs = [{"dataset": args.dataset, "row": r, "seed": int(s), **extra, **({"quick": True} if args.quick else {})}
             for s in args.seeds.split(",") for r in rows]
    root, done = Path(args.root), []
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = [pool.submit(run_one, spec, root) for spec in specs]
        for future in as_completed(futures):
            result = future.result()
            done.append(result)
            if not args.quick:
                save(done)
            print(json.dumps({"name": row_name(result), **{k: result.get(k) for k in ("dataset", "seed", "accuracy", "macro_f1",
                                                         "max_client_epsilon", "seconds", "error")}}), flush=True)
    return 0 if all("error" not in r for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
