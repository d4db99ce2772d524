"""What the accuracy benchmarks share: one federation in-process, one run per subprocess,
their command-line plumbing, and the canaries placed in one client's records.

Every run of `bench/dp_recipe.py`, `bench/dp_scale.py`, `bench/continual.py` and
`bench/privacy_utility.py` is the real ServerApp and ClientApp driven in one process
(`fedcl.ops.run.run_inprocess`); a run that needs its own process (a fresh torch, one
thread, its memory given back) is started as `python -m bench.NAME --worker SPEC --work
FOLDER` and writes `FOLDER/result.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def federate(config_file: Path | None, overrides: list[str], folder: Path, *, intercept=None):
    """One federation through the real apps, in this process, with its run and state folders
    in `folder`; (config, metrics.json, seconds). A client's error reply fails the run: a
    figure from a federation that lost clients is not the figure asked for."""
    from fedcl.config import load_config
    from fedcl.ops.run import run_inprocess

    config = load_config(config_file, overrides + [f"run.out_dir={folder / 'run'}",
                                                   f"run.state_dir={folder / 'state'}"])
    started = time.perf_counter()
    grid = run_inprocess(config, intercept=intercept)
    seconds = time.perf_counter() - started
    errors = [r.error.reason for r in grid.replies if r.has_error()]
    if errors:
        raise RuntimeError(f"client errors in {folder.name}: {errors[:3]}")
    return config, json.loads((folder / "run" / "metrics.json").read_text()), seconds


def run_worker(module: str, spec: dict, work: Path) -> dict:
    """`spec` run by `python -m MODULE --worker` in a process of its own (one torch thread),
    its output in `work/log.txt`; the worker's result, or `{**spec, "error": ...}`."""
    log = work / "log.txt"
    with log.open("w") as out:
        code = subprocess.call([sys.executable, "-m", module, "--worker", json.dumps(spec), "--work", str(work)],
                               cwd=REPO, env={**os.environ, **ONE_THREAD}, stdout=out, stderr=subprocess.STDOUT)
    if code:
        return {**spec, "error": f"exit {code}; log {log}"}
    return json.loads((work / "result.json").read_text())


def add_worker_flags(ap: argparse.ArgumentParser) -> None:
    """The hidden flags `run_worker` starts a run with."""
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)


def serve_worker(args: argparse.Namespace, worker: Callable[[dict, Path], dict]) -> bool:
    """When started by `run_worker`: run `worker` and write its result; whether it was."""
    if not args.worker:
        return False
    result = worker(json.loads(args.worker), Path(args.work))
    (Path(args.work) / "result.json").write_text(json.dumps(result))
    return True


def parse_rows(ap: argparse.ArgumentParser, text: str, known) -> list[str]:
    """`--rows a,b`: the names, each one of `known` (else the parser's error naming the choices)."""
    rows = [r for r in text.split(",") if r]
    unknown = [r for r in rows if r not in known]
    if unknown:
        ap.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def place_canaries(train: list[dict], test: list[dict], inside: list[dict], clients: int,
                   rng: random.Random, work: Path) -> list[str]:
    """Every training record to one of `clients` sites at random and every canary in `inside`
    to site 0, written as `work/train.jsonl` (shuffled) and `work/test.jsonl`; the data
    overrides that read them, one site a client."""
    rows = [{"text": r["text"], "label": r["label"], "site": f"site-{rng.randrange(clients)}"}
            for r in train] + [{**c, "site": "site-0"} for c in inside]
    rng.shuffle(rows)
    write_jsonl(work / "train.jsonl", rows)
    write_jsonl(work / "test.jsonl", [{"text": r["text"], "label": r["label"]} for r in test])
    return ["data.dataset=", f"data.path={work / 'train.jsonl'}", f"data.test_path={work / 'test.jsonl'}",
            "data.partition=column", "data.partition_column=site"]
