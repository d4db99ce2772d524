"""The continual-update job: registry's latest adapter + a new data drop -> the next version.

`run_update` reads one file per institution (simulation), merges them into one
file in the job's scratch folder with a meta column naming each record's
institution, and runs the configured federation with
``data.partition = "column"`` on that column, so client k holds exactly one
institution's records (one file: the config's own clients and partition).
Round 1 starts from the registry's latest adapter (`run.init_adapter`), or a
fresh adapter when the registry is empty. The server's round-0 evaluation is
the parent adapter on the new test split ("old"), the last round's is the new
adapter on it ("new"). Only on a completed run is the adapter committed, with
sha256 fingerprints of each institution's records and of the test split, and
the epsilon each client spent in this job (see continual/registry.py).

Privacy ledgers live in the job's folder unless `run.state_dir` is set: a
deployment keeps lifetime ledgers on the nodes, and a simulation that should
account across versions names a lasting state folder.

`run_deployed_update` is the same job on a real federation: the institutions'
SuperNodes train on their own files (their node config's ``data-file``), so
the job has no data files; each node reports the sha256 fingerprint of its
file with its update (``data-sha256``, computed as `fedcl.data.fingerprint`
computes it in simulation), and the version records those. `submit(config)`
runs the federation (`fedcl update --deployment` submits it with ``flwr run``
and waits for it to finish).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from fedcl import data, keys
from fedcl.config import Config
from fedcl.continual.registry import ADAPTER_DIR, Registry
from fedcl.rundir import RunDir

INSTITUTION_COLUMN = "fedcl_institution"


class UpdateError(RuntimeError):
    """The federated run of an update did not complete; the registry is unchanged."""


def merge_files(files: list[str | Path], cfg: data.DataConfig, target: Path) -> dict[str, str]:
    """Write the institutions' records to `target` (JSONL) tagged with their file index;
    return {file name: fingerprint of its records}. Each file is checked on its own first."""
    fingerprints, lines = {}, []
    for index, path in enumerate(files):
        records = data.load_records(path, cfg)
        fingerprints[f"{index}:{Path(path).name}"] = data.fingerprint(records)
        for record in records:
            if INSTITUTION_COLUMN in record["meta"]:
                raise data.DataError(f"{path}: column {INSTITUTION_COLUMN!r} is reserved for the "
                                     "update job's institution tag")
            lines.append(json.dumps(_row(record, cfg) | {INSTITUTION_COLUMN: str(index)},
                                    ensure_ascii=False))
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return fingerprints


def _row(record: dict, cfg: data.DataConfig) -> dict:
    if cfg.task == "classification":
        fields = {cfg.text_column: record["text"], cfg.label_column: record["label"]}
    else:
        fields = {cfg.prompt_column: record["prompt"], cfg.response_column: record["response"]}
    return {**record["meta"], **fields}


def job_config(base: Config, files: list[str], merged: Path, run_dir: Path, state_dir: Path,
               init_adapter: Path | None) -> Config:
    """The job's run config: the merged data, its own run folder, the parent adapter."""
    keys = {"data.path": str(merged), "data.dataset": "", "run.out_dir": str(run_dir),
            "run.init_adapter": str(init_adapter or "")}
    if len(files) > 1:
        keys.update({"data.partition": "column", "data.partition_column": INSTITUTION_COLUMN,
                     "federation.clients": len(files)})
        if base.federation.clients_per_round > len(files):
            keys["federation.clients_per_round"] = len(files)
    if not base.run.state_dir:
        keys["run.state_dir"] = str(state_dir)
    return base.replace(keys, source="update")


def client_files(config: Config, files: list[str]) -> dict[str, str]:
    """{client id: the institution file it holds} (one file: every client holds part of it)."""
    if len(files) == 1:
        return {str(c): Path(files[0]).name for c in range(config.federation.clients)}
    dataset = data.load_dataset(config.data, config.train.seed)
    shares = data.partition(dataset.train, config.federation.clients, "column",
                            column=INSTITUTION_COLUMN)
    return {str(c): Path(files[int(share[0]["meta"][INSTITUTION_COLUMN])]).name
            for c, share in enumerate(shares)}


def epsilon_spent(metrics: dict) -> dict:
    """Each client's latest reported epsilon in this job, and the largest."""
    per_client: dict[str, float] = {}
    for record in metrics.get(keys.ROUNDS, []):
        for client in record.get(keys.CLIENTS, []):
            if "epsilon" in client:
                per_client[str(client["id"])] = float(client["epsilon"])
    return {"clients": per_client, "max": max(per_client.values()) if per_client else None}


def recorded_config(config: Config, parent: str | None) -> dict:
    """The resolved config, with the job's scratch paths replaced by what they stood for."""
    resolved = config.to_dict()
    resolved["data"]["path"] = "(merged update files; see data_fingerprints)"
    resolved["run"].update(out_dir="", state_dir="" if "/.jobs/" in config.run.state_dir
                           else config.run.state_dir,
                           init_adapter=f"versions/{parent}/{ADAPTER_DIR}" if parent else "")
    return resolved


def run_update(base: Config, registry: str | Path, files: list[str], *,
               runner: Callable[[Config], None], check: Callable[[Config], None] | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Run one update job and commit its version; returns the committed record.

    `runner(config)` runs the federation (fedcl.ops.run.simulate, or an
    in-process driver in tests); `check(config)` validates before the run.
    Any exception leaves the registry as it was.
    """
    if not files:
        raise ValueError("--data: an update needs at least one data file")
    reg = Registry(registry)
    with reg.job() as job:
        parent = reg.latest_name()
        fingerprints = merge_files(files, base.data, job.path / "data.jsonl")
        config = job_config(base, files, job.path / "data.jsonl", job.path / "run", job.path / "state",
                            reg.adapter_dir(parent) if parent else None)
        if config.continual_on:
            from fedcl.continual.schedule import resolve_rounds

            config = resolve_rounds(config)
        if check is not None:
            check(config)
        dataset = data.load_dataset(config.data, config.train.seed)
        fingerprints["test"] = data.fingerprint(dataset.test)
        log(f"update: {parent or 'a fresh adapter'} + {len(files)} file(s), "
            f"{config.federation.clients} clients, {config.federation.rounds} rounds")
        runner(config)
        name = _commit(reg, job, parent, config, fingerprints, client_files(config, files))
    return reg.record(name)


def _completed(config: Config, reg: Registry) -> tuple[RunDir, int]:
    run_dir = RunDir(config.run.out_dir)
    done = run_dir.completed_rounds()
    if done < config.federation.rounds:
        raise UpdateError(f"the run stopped after round {done} of {config.federation.rounds}; "
                          f"the registry {reg.root} is unchanged")
    return run_dir, done


def _commit(reg: Registry, job, parent: str | None, config: Config, fingerprints: dict,
            clients: dict, *, data_path: str = "(merged update files; see data_fingerprints)") -> str:
    """Move the completed run's last adapter into the job's stage and commit the version."""
    run_dir, done = _completed(config, reg)
    metrics = run_dir.metrics()
    job.stage.mkdir()
    shutil.move(str(run_dir.adapter_dir(done)), str(job.stage / ADAPTER_DIR))
    recorded = recorded_config(config, parent)
    recorded["data"]["path"] = data_path
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": recorded,
        "data_fingerprints": fingerprints,
        "clients": clients,
        "metrics": {"old": metrics.get(keys.INITIAL_EVAL, {}), "new": metrics[keys.ROUNDS][-1][keys.EVAL]},
        "epsilon": epsilon_spent(metrics),
        "rounds": done,
    }
    return reg.commit(job, record, parent=parent)


# -- deployment: the nodes' own data ----------------------------------------------------------

def words_fingerprint(words) -> str:
    if len(words) != 8 or any(not float(w).is_integer() or not 0 <= w < 2 ** 32 for w in words):
        raise ValueError(f"data-sha256: expected 8 whole 32-bit words, got {words!r}")
    return "".join(f"{int(w):08x}" for w in words)


def node_fingerprints(metrics: dict) -> dict[str, str]:
    """{"node <id>": sha256 of its data file} from the clients' train replies (latest per node)."""
    out: dict[str, str] = {}
    for record in metrics.get(keys.ROUNDS, []):
        for client in record.get(keys.CLIENTS, []):
            if "data_sha256" in client:
                out[f"node {client['id']}"] = words_fingerprint(client["data_sha256"])
    return out


def run_deployed_update(base: Config, registry: str | Path, *, submit: Callable[[Config], None],
                        log: Callable[[str], None] = print) -> dict:
    """One update job on a deployed federation (the nodes' own files); commits its version.

    The coordinator's own evaluation data (`base.data`) gives the "old" and
    "new" scores and the test fingerprint. Any exception leaves the registry
    as it was.
    """
    reg = Registry(registry)
    with reg.job() as job:
        parent = reg.latest_name()
        config = base.replace({"run.out_dir": str(job.path / "run"),
                               "run.init_adapter": str(reg.adapter_dir(parent) if parent else "")},
                              source="update")
        if config.continual_on:
            from fedcl.continual.schedule import resolve_rounds

            config = resolve_rounds(config)
        dataset = data.load_dataset(config.data, config.train.seed)
        fingerprints = {"test": data.fingerprint(dataset.test)}
        log(f"update: {parent or 'a fresh adapter'} on the deployed federation's own data, "
            f"{config.federation.rounds} rounds")
        submit(config)
        run_dir, _ = _completed(config, reg)
        nodes = node_fingerprints(run_dir.metrics())
        if not nodes:
            raise UpdateError("no node reported the fingerprint of its data (data-sha256); "
                              "the nodes must run this fedcl version; the registry is unchanged")
        fingerprints.update(nodes)
        name = _commit(reg, job, parent, config, fingerprints, {n.split()[-1]: "its own data-file" for n in nodes},
                       data_path="(each node's own data-file; see data_fingerprints)")
    return reg.record(name)


def format_versions(records: list[dict]) -> str:
    """The lineage as a table: version, parent, created, score (parent -> new), epsilon, data."""
    head = ("version", "parent", "created", "score (parent -> new)", "max eps", "data (sha256)")
    rows = [head]
    for rec in records:
        rows.append((rec["version"], rec["parent"] or "-", rec.get("created", "")[:19],
                     _score(rec.get("metrics", {})), _eps(rec.get("epsilon", {})),
                     " ".join(f"{k.split(':')[-1]}={v[:8]}"
                              for k, v in rec.get("data_fingerprints", {}).items())))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]).rstrip()
                     for row in rows)


def _score(metrics: dict) -> str:
    old, new = metrics.get("old", {}), metrics.get("new", {})
    key = "accuracy" if "accuracy" in new else "loss"
    if key not in new:
        return "-"
    before = f"{old[key]:.3f}" if key in old else "?"
    return f"{key} {before} -> {new[key]:.3f}"


def _eps(epsilon: dict) -> str:
    return "-" if epsilon.get("max") is None else f"{epsilon['max']:.2f}"
