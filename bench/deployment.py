"""Deployment benchmark (issues 6 and 17): round time of a real deployment against the
same rounds on the simulation engine, with a fresh ClientApp process per message, with
each node's model kept loaded (`fedcl.client.worker`) and with, besides, one long-lived
executor per node serving every message (`fedcl.client.executor`), the replies counted
with 12 SuperNodes, and the coordinator's and nodes' resident memory.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.deployment [--rounds 3] [--large-rounds 3]
        [--modes executor,kept,fresh] [--large-mode executor] [--busy N] [--trace]

`--busy N` runs N spinning processes beside it (load, as on a shared server); `--trace`
stamps every process's log lines and reports where each message's time goes;
`FEDCL_SUPERLINK_BUSY_TIMEOUT_S=5` gives the SuperLink Flower's own lock wait (the
result records the wait the SuperLink used).

It ends with one line, measured in that run:
`steady round deployed/simulated: R.RRx (executor), R.RRx (kept model), ...; 12 nodes: A of B replies counted`.

One run, side by side on the tiny model (`--model smollm2-135m`: a round with real work),
from the same data files and config:

- simulation: `fedcl simulate` (Flower's simulation engine on Ray) with 3 clients;
- deployment: a `flower-superlink` and 3 `flower-supernode` processes on 127.0.0.1
  with TLS and node authentication, started as `ops/deploy/launch.py` starts
  them and the run submitted with `flwr run`;
- the same deployment with each node's worker keeping its model loaded;
- the same again with each SuperNode in `--isolation process` and one executor per node
  running every message in-process (handing it to the node's worker): no process per message;
- 12 SuperNodes (executors and workers by default), 3 rounds, every round waiting for all 12
  replies (up to its timeout), counting what arrived: the 12-node check of
  issue 17 (too slow for the test suite).

Round times come from each run's metrics.json (`round_seconds`: from sending
the round's train messages to the end of the server's evaluation); round 1
(Ray start-up and first model loads in simulation) is reported apart. While
a deployment runs, the resident set size of the SuperLink, its SuperExec, the
ServerApp (`flwr-serverapp`), every SuperNode, its SuperExec and its ClientApps
is sampled once a second, with each process's CPU time (CPU-s a steady round by
process, and at rest). Writes bench/results/deployment.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedcl.ops.deploy import launch, superlink
from fedcl.ops.deploy.certs import generate_certs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
RESULT = "deployment.json"
LABELS = ["Acne", "Birth Control", "Depression", "Pain"]
CONNECTION = "fedcl-bench"
NODE_COUNTS = (3, 12)
RECORDS_PER_NODE = 16
LOCAL_STEPS = 2
BATCH_SIZE = 4
MODEL = "tiny-llama"
MB = 1024 * 1024
# The side-by-side runs wait for every client in every round, so both engines do the same
# work; the large run counts a round with whatever replies came, and waits less for the rest
# (a reply lost on the way costs its round the whole wait).
COMPARE_TIMEOUT = 300
LARGE_TIMEOUT = 240
# Flower's process names, as the second word of their command lines (Python entry points).
ROLES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp")
WORKER_ROLE, EXECUTOR_ROLE = "node-worker", "node-executor"
# fedcl's own processes, started as `python -m MODULE`: the role each one plays.
MODULE_ROLES = {"fedcl.client.worker": WORKER_ROLE,  # supervisor and serving process
                "fedcl.client.executor": EXECUTOR_ROLE,
                "fedcl.ops.deploy.supernode": "flower-supernode",  # Flower's, through fedcl's wrapper
                "fedcl.ops.deploy.superlink": "flower-superlink"}
# The deployed configurations: what a SuperNode runs its ClientApp messages with.
MODES = {"fresh": "fresh process per message", "kept": "kept model",
         "executor": "kept model and one executor process"}


def write_data(folder: Path, nodes: int) -> dict[str, Path]:
    """Each institution's own file (built-in demo text), all of them merged (the
    simulation partitions that one file), and the coordinator's test file."""
    from fedcl import data
    from fedcl.config import Config

    dataset = data.load_dataset(Config().data, seed=0)

    def rows(records: list[dict]) -> str:
        return "".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in records)

    files = {}
    for i in range(nodes):
        files[f"hospital-{i:02d}"] = folder / f"hospital-{i:02d}.jsonl"
        files[f"hospital-{i:02d}"].write_text(rows(dataset.train[i::nodes][:RECORDS_PER_NODE]),
                                              encoding="utf-8")
    files["server"] = folder / "server.jsonl"
    files["server"].write_text(rows(dataset.test[:24]), encoding="utf-8")
    return files


@dataclasses.dataclass(frozen=True)
class Workload:
    """What every client does each round, the same for both engines: the default is the
    tiny model, where a round is nearly all Flower's; `--model` shows a round with real work."""
    model: str = MODEL
    local_steps: int = LOCAL_STEPS
    batch_size: int = BATCH_SIZE


def write_config(path: Path, data_files: dict[str, Path], clients: int, *, min_replies: int,
                 timeout: float, workload: Workload = Workload()) -> Path:
    """One config for both engines; the simulation's clients split `merged.jsonl`
    (the deployed nodes' files, one after the other) into the same sizes."""
    merged = path.parent / f"merged-{clients}.jsonl"
    merged.write_text("".join(data_files[f"hospital-{i:02d}"].read_text(encoding="utf-8")
                              for i in range(clients)), encoding="utf-8")
    path.write_text(f"""[model]
name = "{workload.model}"
[data]
dataset = ""
path = "{merged}"
test_path = "{data_files['server']}"
labels = "{','.join(LABELS)}"
[train]
batch_size = {workload.batch_size}
local_steps = {workload.local_steps}
[federation]
clients = {clients}
min_replies = {min_replies}
timeout = {timeout}
""", encoding="utf-8")
    return path


def checkpoint_round(run_dir: Path) -> int:
    path = run_dir / "checkpoint.json"
    try:
        return json.loads(path.read_text())["round"] if path.exists() else 0
    except (OSError, ValueError):  # read while being replaced
        return 0


def role_of(cmdline: list[str]) -> str:
    for word in cmdline[:3]:
        if word in MODULE_ROLES:
            return MODULE_ROLES[word]
    for word in cmdline[:2]:
        name = os.path.basename(word)
        if name in ROLES:
            return name
    return "other"


def short_name(cmdline: list[str]) -> str:
    """A process outside Flower's roles, named for the CPU table (`fedcl`, `raylet`, `ray::...`)."""
    words = [w for w in cmdline[:3] if not os.path.basename(w).startswith(("python", "-"))]
    return os.path.basename(words[0]).split(" ")[0][:40] if words else "python"


class RssSampler(threading.Thread):
    """Samples, once a second, the RSS by Flower role of each watched process tree,
    with how many rounds the run folder has committed (-1 before the run is submitted,
    -2 while the processes still start, before `settled`)."""

    def __init__(self, roots: dict[str, launch.Launched], run_dir: Path, interval: float = 1.0):
        super().__init__(daemon=True)
        self.roots, self.run_dir, self.interval = roots, run_dir, interval
        self.submitted = False
        self.settled = True  # False: samples taken while the processes still start (round -2)
        self.samples: list[dict] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            table = launch.process_table()
            before = -1 if self.settled else -2
            sample = {"round": checkpoint_round(self.run_dir) if self.submitted else before, "trees": {},
                      "load": os.getloadavg()[0]}
            for name, root in self.roots.items():
                by_role: dict[str, list[float]] = {}
                tree = {root.pid} | launch.process_tree(root.pid, table)
                for companion in root.companions:  # a node's worker, started beside its SuperNode
                    tree |= {companion.pid} | launch.process_tree(companion.pid, table)
                # A ServerApp outlives a crashed SuperExec (re-parented, its --parent-pid gone):
                # keep the long-lived processes seen once, in the sample and for root.stop().
                tree |= {pid for pid in root.known if pid in table}
                for pid in tree:
                    if pid in table:
                        role = role_of(table[pid]["cmdline"])
                        if role in ("flwr-serverapp", "flower-superexec"):
                            root.known.add(pid)
                        by_role.setdefault(role, []).append(table[pid]["rss"] / MB)
                        sample.setdefault("cpu", {})[pid] = (name, role if role != "other" else
                                                             short_name(table[pid]["cmdline"]), table[pid]["cpu"])
                sample["trees"][name] = by_role
            self.samples.append(sample)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join()


def _stats(values: list[float]) -> dict:
    return {"peak_mb": max(values), "median_mb": statistics.median(values)} if values else {}


def memory_summary(samples: list[dict], rounds: int, nodes: list[str]) -> dict:
    """Coordinator: idle (nodes connected, before the run), peak (whole run), steady
    (median once round 1 was committed). Nodes: per SuperNode, and ClientApp peak."""
    idle = [s for s in samples if s["round"] == -1]
    run = [s for s in samples if s["round"] >= 0]
    steady = [s for s in run if 1 <= s["round"] < rounds] or run

    def coord(sample: dict, role: str) -> float:
        by_role = sample["trees"]["coordinator"]
        return sum(sum(v) for v in by_role.values()) if role == "total" else sum(by_role.get(role, []))

    coordinator = {}
    for role in ("flower-superlink", "flwr-serverapp", "flower-superexec", "total"):
        values = [coord(s, role) for s in run if role == "total" or role in s["trees"]["coordinator"]]
        steady_values = [coord(s, role) for s in steady if role == "total" or role in s["trees"]["coordinator"]]
        coordinator[role] = {**_stats(values), "steady_mb": statistics.median(steady_values) if steady_values else None,
                             "idle_mb": statistics.median([coord(s, role) for s in idle]) if idle else None}
    per_node = [sum(s["trees"][n].get("flower-supernode", [])) for s in run for n in nodes]
    node_exec = [sum(s["trees"][n].get("flower-superexec", [])) for s in run for n in nodes]
    clientapps = [x for s in run for n in nodes for x in s["trees"][n].get("flwr-clientapp", [])]
    all_nodes = [sum(sum(v) for t in (s["trees"][n] for n in nodes) for v in t.values()) for s in run]
    workers = [sum(s["trees"][n].get(WORKER_ROLE, [])) for s in run for n in nodes]
    executors = [sum(s["trees"][n].get(EXECUTOR_ROLE, [])) for s in run for n in nodes]
    # How many ClientApp processes lived at once (each imports what its message needs), and
    # the machine's load meanwhile: what a node's reply competes with for the CPU.
    alive = [sum(len(s["trees"][n].get("flwr-clientapp", [])) for n in nodes) for s in run]
    loads = [s.get("load", 0.0) for s in run]
    return {"coordinator": coordinator, "samples": len(samples), "node_worker": _stats([w for w in workers if w]),
            "node_executor": _stats([e for e in executors if e]),
            "clientapps_alive_peak": max(alive, default=0), "load_peak": max(loads, default=0.0),
            "load_median": statistics.median(loads) if loads else 0.0,
            "supernode": _stats(per_node), "supernode_superexec": _stats(node_exec),
            "clientapp": _stats(clientapps), "all_nodes_total": _stats(all_nodes)}


def cpu_used(window: list[dict]) -> dict[str, float]:
    """CPU seconds each role's processes used over consecutive samples (each process from
    the first sample it is in to the last)."""
    first: dict[int, float] = {}
    last: dict[int, tuple] = {}
    for s in window:
        for pid, (tree, role, cpu) in s.get("cpu", {}).items():
            first.setdefault(pid, cpu)
            last[pid] = (tree, role, cpu)
    by_role: dict[str, float] = {}
    for pid, (tree, role, cpu) in last.items():
        key = f"coordinator {role}" if tree in ("coordinator", "simulation") else f"node {role}"
        by_role[key] = by_role.get(key, 0.0) + cpu - first[pid]
    return by_role


def settle(sampler: RssSampler, quiet: float = 0.2, timeout: float = 120.0) -> None:
    """Wait until the watched processes use less than `quiet` CPU-s per second (over the
    last 3 samples), or `timeout`: the idle figure is then the federation at rest, not its start."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(1)
        window = sampler.samples[-4:]
        if len(window) == 4 and sum(cpu_used(window).values()) / 3 < quiet:
            return


def cpu_summary(samples: list[dict]) -> dict:
    """CPU seconds (user and system) each role's processes used per steady round (from the
    first sample after round 1 was committed to the first sample of the last round), and per
    second while idle (every node connected, no run). CPU time, unlike the seconds a round
    takes, does not grow much when other work shares the machine (only the polling, which
    runs by the clock), so it says where a round's compute goes.
    A process that started and ended between two samples (a fresh ClientApp) is missed."""
    out: dict = {}
    committed = [s for s in samples if s["round"] >= 1]
    final = max((s["round"] for s in committed), default=0)
    # From round 1 committed to the last round committed: no start-up, no tear-down.
    steady = [s for s in committed if s["round"] < final] + [s for s in committed if s["round"] == final][:1]
    if len(steady) >= 2 and steady[-1]["round"] > steady[0]["round"]:
        rounds = steady[-1]["round"] - steady[0]["round"]
        per_round = {k: v / rounds for k, v in sorted(cpu_used(steady).items())}
        out["steady_rounds_measured"] = rounds
        out["per_steady_round_s"] = {k: round(v, 3) for k, v in per_round.items()}
        out["total_per_steady_round_s"] = round(sum(per_round.values()), 3)
    idle = [s for s in samples if s["round"] == -1]
    if len(idle) >= 2:
        seconds = max(len(idle) - 1, 1)  # one sample a second
        idle_used = cpu_used(idle)
        out["idle_per_second_s"] = round(sum(idle_used.values()) / seconds, 3)
        out["idle_per_second_by_process_s"] = {k: round(v / seconds, 3) for k, v in sorted(idle_used.items())}
    return out


def round_summary(metrics: dict) -> dict:
    rounds = [{"round": r["round"], "round_seconds": r["round_seconds"], "replies": len(r["clients"]),
               "failures": r["failures"],
               "slowest_client_train_seconds": max((c.get("train_seconds", 0.0) for c in r["clients"]), default=0.0),
               "slowest_client_eval_seconds": r.get("client_eval_seconds_max", 0.0),
               "server_eval_seconds": r.get("server_eval_seconds", 0.0)} for r in metrics["rounds"]]
    later = rounds[1:]
    # The work itself: the slowest client's training and evaluation, and the server's evaluation.
    work = [r["slowest_client_train_seconds"] + r["slowest_client_eval_seconds"] + r["server_eval_seconds"]
            for r in later]
    return {"rounds": rounds, "round_1_seconds": rounds[0]["round_seconds"],
            "later_mean_seconds": statistics.mean(r["round_seconds"] for r in later) if later else None,
            "later_work_mean_seconds": statistics.mean(work) if work else None}


def simulate(work: Path, config: Path, rounds: int) -> dict:
    run_dir = work / "sim-run"
    proc = launch.launch("simulation", ["fedcl", "simulate", "--config", str(config), "--rounds", str(rounds),
                                        "--out", str(run_dir)], log=work / "logs" / "simulation.log", cwd=ROOT)
    sampler = RssSampler({"simulation": proc}, run_dir)
    sampler.submitted = True
    sampler.start()
    started = time.time()
    try:
        launch.wait_for(lambda: proc.proc.poll() is not None, timeout=900, what="the simulation", interval=1)
        wall = time.time() - started
        if proc.proc.returncode != 0:
            raise RuntimeError(f"simulation failed ({proc.proc.returncode}):\n{proc.tail()}")
    finally:
        sampler.stop()
        proc.stop()
    totals = [sum(sum(v) for v in s["trees"]["simulation"].values()) for s in sampler.samples]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"clients": metrics_clients(metrics), "wall_seconds": wall, **round_summary(metrics),
            "process_tree_rss": _stats(totals), "cpu": cpu_summary(sampler.samples)}


def metrics_clients(metrics: dict) -> int:
    return max(len(r["clients"]) for r in metrics["rounds"])


def deploy(work: Path, keys, data_files: dict[str, Path], app: Path, nodes: int, rounds: int, *,
           compare: bool, mode: str, keep_logs: Path | None = None, workload: Workload = Workload()) -> dict:
    """A fresh SuperLink (own database) and `nodes` SuperNodes; one run of `rounds` rounds.
    `mode` (MODES): "kept", each SuperNode with its worker (`fedcl.client.worker`), model kept
    loaded; "executor", besides, in `--isolation process` with its executor."""
    root = work / f"deploy-{nodes}-{mode}"
    home, run_dir = root / "flwr-home", root / "run"
    names = [f"hospital-{i:02d}" for i in range(nodes)]
    config = write_config(root.parent / f"deploy-{nodes}.toml", data_files, nodes,
                          min_replies=nodes if compare else 1, timeout=COMPARE_TIMEOUT if compare else LARGE_TIMEOUT,
                          workload=workload)
    port = launch.free_port()
    address = f"127.0.0.1:{port}"
    started: list[launch.Launched] = []
    sampler = None
    try:
        link = launch.start_superlink(keys, port=port, database=root / "superlink.db",
                                      log=root / "logs" / "superlink.log", flwr_home=home)
        started.append(link)
        launch.write_connection(home, CONNECTION, address, keys.ca_cert)
        node_procs = {}
        for i, name in enumerate(names):
            launch.register_node(keys, name, CONNECTION, home)
            node_procs[name] = launch.start_supernode(
                keys, name, superlink=address, runtime_port=launch.free_port(), data_file=data_files[name],
                state_dir=root / "state" / name, partition_id=i, log=root / "logs" / f"{name}.log",
                flwr_home=home, worker=mode != "fresh", executor=mode == "executor")
            started.append(node_procs[name])
        launch.wait_for(lambda: launch.online_nodes(CONNECTION, home) == nodes, timeout=60 + 10 * nodes,
                        what=f"{nodes} SuperNodes online", process=link, interval=2)
        sampler = RssSampler({"coordinator": link, **node_procs}, run_dir)
        sampler.settled = False
        sampler.start()
        settle(sampler)  # the node workers load their models after their sockets open
        sampler.settled = True
        time.sleep(5)  # a few idle samples: the SuperLink with every node connected, no run
        sampler.submitted = True
        submitted = time.time()
        launch.submit_run(app, CONNECTION, {"config": str(config), "run.out_dir": str(run_dir),
                                            "federation.rounds": rounds}, home)
        launch.wait_for(lambda: checkpoint_round(run_dir) >= rounds, timeout=rounds * (2 * COMPARE_TIMEOUT + 300),
                        what=f"round {rounds} with {nodes} SuperNodes", process=link, interval=1)
        wall = time.time() - submitted
    finally:
        if sampler is not None:
            sampler.stop()
        for proc in reversed(started):
            proc.stop()
        if keep_logs is not None:  # the work folder is temporary
            shutil.copytree(root / "logs", keep_logs / root.name, dirs_exist_ok=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"supernodes": nodes, "mode": mode, "kept_model": mode != "fresh", "wall_seconds": wall, **round_summary(metrics),
            "memory": memory_summary(sampler.samples, rounds, names), "cpu": cpu_summary(sampler.samples),
            "errors": log_errors(root / "logs"),
            **({"message_steps": steps} if (steps := message_steps(root / "logs")) else {})}


TRACE_SITE = Path(__file__).parent / "trace"  # its sitecustomize stamps every log line
STEPS = ("receive", "work", "send", "to_next")
_STAMPED = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) .*?(Receiving: |Received successfully|Sending: |Sent successfully)")


def message_steps(logs: Path, skip: int = 2) -> dict:
    """With `--trace`: the steps of each message at the SuperNodes after their first `skip`
    (round 1's train and evaluate), from their stamped logs, as [min, median, max] seconds:
    receive ("Receiving" to "Received successfully": pulled from the SuperLink), work (to
    "Sending": the ClientApp's turn), send (to "Sent successfully": pushed to the SuperLink)
    and to_next (to the next "Receiving": the server's turn and the node's pull)."""
    found: dict[str, list[float]] = {step: [] for step in STEPS}
    for log in sorted(logs.glob("hospital-??.log")):
        marks = [(int(h) * 3600 + int(m) * 60 + int(sec) + int(ms) / 1000, what)
                 for h, m, sec, ms, what in _STAMPED.findall(log.read_text(encoding="utf-8", errors="replace"))]
        messages = [marks[i:i + 4] for i in range(len(marks) - 3)
                    if [w for _, w in marks[i:i + 4]] == ["Receiving: ", "Received successfully", "Sending: ",
                                                          "Sent successfully"]]
        for n, message in enumerate(messages):
            if n < skip:
                continue
            (t0, _), (t1, _), (t2, _), (t3, _) = message
            found["receive"].append(t1 - t0)
            found["work"].append(t2 - t1)
            found["send"].append(t3 - t2)
            if n + 1 < len(messages):
                found["to_next"].append(messages[n + 1][0][0] - t3)
    return {step: [round(min(v), 3), round(statistics.median(v), 3), round(max(v), 3)]
            for step, v in found.items() if v}


def log_errors(logs: Path) -> dict:
    """What went wrong on the way, as the processes logged it."""
    link = (logs / "superlink.log").read_text(encoding="utf-8", errors="replace")
    nodes = [p.read_text(encoding="utf-8", errors="replace") for p in logs.glob("hospital-*.log")
             if not p.name.endswith(("-worker.log", "-executor.log"))]
    workers = [p.read_text(encoding="utf-8", errors="replace") for p in logs.glob("hospital-*-worker.log")]
    executors = [p.read_text(encoding="utf-8", errors="replace") for p in logs.glob("hospital-*-executor.log")]
    tasks = [line for e in executors for line in e.splitlines() if line.startswith("executor | pid ")]
    return {"superlink_database_locked": link.count("database is locked"),
            "node_worker_restarts": sum(w.count("; restarting in") for w in workers),
            "node_worker_messages_failed": sum(w.count(" | failed") for w in workers),
            "clientapp_without_worker": sum(n.count("not reachable after") for n in nodes),
            "superlink_http_500": link.count(" 500"),
            "superlink_superexec_crashed": "flower-superexec\", line" in link,
            "node_replies_not_delivered": sum(n.count("Failed to send message") for n in nodes),
            # Every task of a node served by one process: tasks, and distinct executor pids.
            "executor_tasks": len(tasks), "executor_tasks_failed": sum("| failed" in t for t in tasks),
            "executor_pids": len({t.split(" | ")[1] for t in tasks})}


def _mb(stats: dict, key: str = "peak_mb") -> str:
    value = stats.get(key) if stats else None
    return f"{value:.0f}" if value is not None else "-"


def render(r: dict) -> list[str]:
    sim = r["simulation"]
    lines = [f"## Deployment against simulation ({r['model']}, measured {r['when']})", "",
             f"One benchmark run (`python -m bench.deployment`), side by side: the same config "
             f"({r['local_steps']} local steps of batch {r['batch_size']}, every client every round, "
             f"{RECORDS_PER_NODE} records per client) on Flower's simulation engine (Ray, 1 CPU per "
             "client) and as a real deployment on 127.0.0.1 (a `flower-superlink` and one "
             "`flower-supernode` per client, TLS and node authentication, submitted with `flwr run`). "
             "Round time is metrics.json's `round_seconds` (train messages sent to server evaluation "
             "done); round 1 carries start-up and is shown apart. "
             + (f"{r['busy_processes']} busy processes (one spinning core each) ran beside it, as load. "
                if r.get("busy_processes") else "")
             + f"The machine was shared with other work (load average {r['load_before'][0]:.1f} before, "
             f"{r.get('load_after', r.get('load_now', [0.0]))[0]:.1f} after, on 2 cores): read the ratio, not the seconds.", "",
             "| run | round 1 s | later rounds s (mean) | of which training and evaluation s | per round s "
             "| replies per round | run wall s |", "|---|---|---|---|---|---|---|"]

    def row(label: str, x: dict) -> str:
        later = f"{x['later_mean_seconds']:.1f}" if x["later_mean_seconds"] is not None else "-"
        work = f"{x['later_work_mean_seconds']:.2f}" if x["later_work_mean_seconds"] is not None else "-"
        per = ", ".join(f"{y['round_seconds']:.1f}" for y in x["rounds"])
        replies = ", ".join(str(y["replies"]) for y in x["rounds"])
        return (f"| {label} | {x['round_1_seconds']:.1f} | {later} | {work} | {per} | {replies} "
                f"| {x['wall_seconds']:.0f} |")

    lines.append(row(f"simulation, {sim['clients']} clients", sim))
    for d in r["deployments"]:
        if "error" not in d:
            lines.append(row(label(d), d))

    def times(value) -> str:
        return f"{value:.2f}x" if value is not None else "-"

    for tag, how in MODES.items():
        if f"{tag}_round_1" in r.get("ratio", {}):
            lines.append(f"| **deployment ({how}) / simulation, {NODE_COUNTS[0]} clients** "
                         f"| {times(r['ratio'][f'{tag}_round_1'])} | {times(r['ratio'][f'{tag}_later_rounds'])} "
                         "| | | | |")
    lines += ["",
              "Training and evaluation: the slowest client's train and evaluate times and the server's "
              "evaluation, as metrics.json records them. The rest of a round is Flower's: in deployment "
              "every message starts a fresh ClientApp process on its node (subprocess isolation; two "
              "per node per round, train and evaluate), where the simulation's Ray workers keep the "
              "model loaded after round 1. The deployed clients hold 20% of their file out as a test "
              "split (unused by them), so they train and evaluate on slightly fewer records than the "
              "simulated ones; a round's training is the same number of steps either way. With the kept "
              "model, each SuperNode has a worker (`fedcl.client.worker`) that holds the model, "
              "tokenizer and data; Flower still starts a ClientApp process per message, which then "
              "imports no torch and only forwards the message over the node's Unix socket. With the "
              "executor, each SuperNode runs in `--isolation process` and starts no process at all: "
              "one `fedcl.client.executor` per node claims every message on the SuperNode's Runtime "
              "API and runs the ClientApp in-process (which hands it to the worker).", "",
              "Coordinator resident memory (MB), sampled once a second: SuperLink, the ServerApp "
              "(`flwr-serverapp`, a separate process started by the SuperLink's SuperExec) and that "
              "SuperExec. Idle: every node connected, no run; steady: median once round 1 was committed "
              "(over the whole run when it had one round); peak: the run's maximum. Per SuperNode: the "
              "`flower-supernode` process (its SuperExec and the ClientApp it starts for each message "
              "apart).", "",
              "| SuperNodes | SuperLink idle | SuperLink steady | SuperLink peak | ServerApp steady "
              "| ServerApp peak | SuperExec peak | coordinator total peak | per SuperNode (median / peak) "
              "| its SuperExec | ClientApp peak | node worker peak | node executor peak |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in (d for d in r["deployments"] if "error" not in d):
        m = d["memory"]
        c = m["coordinator"]
        lines.append(f"| {d['supernodes']} {mode_of(d)} | {_mb(c['flower-superlink'], 'idle_mb')} "
                     f"| {_mb(c['flower-superlink'], 'steady_mb')} | {_mb(c['flower-superlink'])} "
                     f"| {_mb(c['flwr-serverapp'], 'steady_mb')} | {_mb(c['flwr-serverapp'])} "
                     f"| {_mb(c['flower-superexec'])} | {_mb(c['total'])} "
                     f"| {_mb(m['supernode'], 'median_mb')} / {_mb(m['supernode'])} "
                     f"| {_mb(m['supernode_superexec'], 'median_mb')} | {_mb(m['clientapp'])} "
                     f"| {_mb(m.get('node_worker', {}))} | {_mb(m.get('node_executor', {}))} |")
    lines.append("")
    for d in r["deployments"]:
        e = d.get("errors", {})
        short = [x for x in d.get("rounds", []) if x["replies"] < d["supernodes"]]
        if d.get("rounds"):
            lines.append(f"- {label(d)}: replies counted per round "
                         f"{', '.join(str(x['replies']) for x in d['rounds'])} of {d['supernodes']}; "
                         f"database locked {e.get('superlink_database_locked', 0)} times, "
                         f"HTTP 500 {e.get('superlink_http_500', 0)}, replies not delivered "
                         f"{e.get('node_replies_not_delivered', 0)}, worker restarts "
                         f"{e.get('node_worker_restarts', 0)}, messages without a worker "
                         f"{e.get('clientapp_without_worker', 0)}"
                         + (f"; executors served {e['executor_tasks']} tasks ({e['executor_tasks_failed']} failed) "
                            f"from {e['executor_pids']} processes" if e.get("executor_tasks") else "")
                         + (f"; at most {d['memory']['clientapps_alive_peak']} ClientApp processes at once, "
                            f"load average {d['memory']['load_median']:.1f} (median) / "
                            f"{d['memory']['load_peak']:.1f} (peak)" if "memory" in d else "") + ".")
        if short:
            lines.append(f"- {d['supernodes']} SuperNodes: " + "; ".join(
                f"round {x['round']} counted {x['replies']} of {d['supernodes']} train replies "
                f"(error replies: {x['failures']})" for x in short) + ".")
        if "error" in d:
            lines.append(f"- {d['supernodes']} SuperNodes: the run did not complete: "
                         f"{d['error'].strip().splitlines()[0][:300]}")
        if e.get("superlink_database_locked") or e.get("node_replies_not_delivered"):
            lines.append(f"- {d['supernodes']} SuperNodes: the SuperLink's SQLite database (`--database`) "
                         f"was locked {e['superlink_database_locked']} times; requests failing that way got "
                         f"HTTP 500, and {e['node_replies_not_delivered']} replies were never delivered "
                         f"(the round then waits out `federation.timeout`)"
                         + ("; the SuperLink's SuperExec exited on such an error (the ServerApp ran on)"
                            if e.get("superlink_superexec_crashed") else "") + ".")
    lines += cpu_lines(r)
    lines += ["", f"For scale, the whole simulation (its process with the ServerApp, Ray and Ray's "
              f"workers) peaked at {_mb(sim['process_tree_rss'])} MB.", ""]
    return lines


def cpu_lines(r: dict) -> list[str]:
    """CPU seconds per steady round by role, each run beside the simulation's."""
    runs = [(f"simulation, {r['simulation']['clients']} clients", r["simulation"])]
    runs += [(label(d), d) for d in r["deployments"] if "error" not in d]
    runs = [(name, x) for name, x in runs if x.get("cpu", {}).get("per_steady_round_s")]
    if not runs:
        return []
    lines = ["", "CPU seconds (user and system, all cores) each kind of process used per steady round, "
             "from /proc once a second: unlike a round's seconds, CPU time grows little when other work "
             "shares the machine (only the nodes' and the ServerApp's polling, which runs by the clock). "
             f"On {os.cpu_count()} cores a round cannot take less than 1/{os.cpu_count()} of its total. "
             "Idle: the federation's CPU seconds per second with every node connected and no run.", "",
             "| run | total per round | by process (per round) | idle per second | by process (idle) |",
             "|---|---|---|---|---|"]
    for name, x in runs:
        c = x["cpu"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(c["per_steady_round_s"].items(), key=lambda kv: -kv[1])
                          if v >= 0.005)
        idle = f"{c['idle_per_second_s']:.2f}" if "idle_per_second_s" in c else "-"
        idle_parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(c.get("idle_per_second_by_process_s", {}).items(),
                                                                 key=lambda kv: -kv[1]) if v >= 0.005) or "-"
        lines.append(f"| {name} | {c['total_per_steady_round_s']:.2f} | {parts} | {idle} | {idle_parts} |")
    return lines


def mode_of(d: dict) -> str:
    return d.get("mode", "kept" if d.get("kept_model") else "fresh")


def label(d: dict) -> str:
    return f"deployment, {d['supernodes']} SuperNodes, {MODES[mode_of(d)]}"


def ratios(result: dict) -> dict:
    """Each 3-node deployment's round 1 and later rounds against the simulation's."""
    sim, out = result.get("simulation"), {}
    for d in result["deployments"]:
        if sim is None or d["supernodes"] != NODE_COUNTS[0] or "error" in d:
            continue
        tag = mode_of(d)
        out[f"{tag}_round_1"] = d["round_1_seconds"] / sim["round_1_seconds"]
        out[f"{tag}_later_rounds"] = (d["later_mean_seconds"] / sim["later_mean_seconds"]
                                      if d["later_mean_seconds"] and sim["later_mean_seconds"] else None)
    return out


def replies_line(result: dict) -> str:
    """The benchmark's verdict, measured in this run."""
    shown = [f"{result['ratio'][f'{tag}_later_rounds']:.2f}x ({MODES[tag]})" for tag in MODES
             if result["ratio"].get(f"{tag}_later_rounds") is not None]
    large = next((d for d in result["deployments"] if d["supernodes"] == NODE_COUNTS[1]), None)
    counted = [r["replies"] for r in large.get("rounds", [])] if large else []
    expected = large["supernodes"] * large["planned_rounds"] if large else 0
    return (f"steady round deployed/simulated: {', '.join(shown) or '-'}; "
            f"{NODE_COUNTS[1]} nodes: {sum(counted)} of {expected} replies counted"
            + (f" (per round {', '.join(map(str, counted))})" if counted else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the side-by-side comparison")
    parser.add_argument("--large-rounds", type=int, default=3, help="rounds with 12 SuperNodes (0: none)")
    parser.add_argument("--modes", default="executor,kept,fresh",
                        help=f"3-node deployments to run, in this order (of {', '.join(MODES)})")
    parser.add_argument("--large-mode", default="executor", choices=list(MODES), help="how the 12 SuperNodes run")
    parser.add_argument("--skip-fresh", action="store_true", help="the same as leaving fresh out of --modes")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="N other busy processes (one spinning core each) for the whole run: load to reproduce under")
    parser.add_argument("--model", default=MODEL, help=f"model.name of every client (default {MODEL}; "
                        "e.g. smollm2-135m for a round with real work)")
    parser.add_argument("--local-steps", type=int, default=LOCAL_STEPS, help="train.local_steps of every client")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="train.batch_size of every client")
    parser.add_argument("--keep-logs", type=Path, help="copy each deployment's process logs here")
    parser.add_argument("--result", default=RESULT, help=f"file name in bench/results (default {RESULT})")
    parser.add_argument("--trace", action="store_true",
                        help="stamp every process's log lines with the time and report each message's steps "
                             "at the SuperNodes (message_steps in the result)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m and not (args.skip_fresh and m == "fresh")]
    if unknown := set(modes) - set(MODES):
        parser.error(f"--modes {args.modes}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    from fedcl.models import BUILTIN_MODELS
    if args.model not in BUILTIN_MODELS:
        parser.error(f"--model {args.model}: not a built-in model; choose from {', '.join(BUILTIN_MODELS)}")
    if args.local_steps < 1 or args.batch_size < 1:
        parser.error(f"--local-steps {args.local_steps} --batch-size {args.batch_size}: each 1 or more")
    if args.busy < 0:
        parser.error(f"--busy {args.busy}: a number of processes, 0 or more")
    # A SIGTERM (a stopped session, `kill`) unwinds like Ctrl-C: the spinners, the deployment's
    # processes and the temporary folder are cleaned up by the `finally`s below.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.trace:  # every process started from here inherits it
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRACE_SITE), os.environ.get("PYTHONPATH")]))
    spinners = [subprocess.Popen([sys.executable, "-c", SPINNER, str(os.getpid())]) for _ in range(args.busy)]
    try:
        run(args, modes)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


# Spinning at normal priority: a loaded machine, as an institution's shared server is. Each
# spinner also ends itself once the benchmark is gone (even killed with SIGKILL, which no
# `finally` sees): it looks at its parent every few million turns, which costs nothing.
SPINNER = """
import os, sys
parent, turns = int(sys.argv[1]), 0
while True:
    turns += 1
    if turns % 2_000_000 == 0 and os.getppid() != parent:
        break
"""


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace, modes: list[str]) -> None:
    small, large = NODE_COUNTS
    workload = Workload(args.model, args.local_steps, args.batch_size)
    result = {"model": workload.model, "when": time.strftime("%Y-%m-%d %H:%M"), "local_steps": workload.local_steps,
              "busy_processes": args.busy,
              "superlink_busy_timeout_s": superlink.busy_timeout_s(),
              "batch_size": workload.batch_size, "load_before": os.getloadavg(),
              "threads": os.environ.get("OMP_NUM_THREADS", "unset"), "deployments": []}
    started = time.time()
    RESULTS.mkdir(exist_ok=True)

    def save() -> None:  # after every run: a benchmark stopped half-way keeps what it measured
        result["ratio"], result["load_now"] = ratios(result), os.getloadavg()
        result["verdict"] = replies_line(result)
        (RESULTS / args.result).write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="fedcl-bench-deploy-") as tmp:
        work = Path(tmp)
        data_files = write_data(work, large)
        keys = generate_certs(work / "keys", [f"hospital-{i:02d}" for i in range(large)])
        app = launch.stage_app(ROOT, work / "app")
        print(f"simulation, {small} clients ...", flush=True)
        config = write_config(work / "sim.toml", data_files, small, min_replies=small, timeout=COMPARE_TIMEOUT,
                              workload=workload)
        result["simulation"] = simulate(work, config, args.rounds)
        save()
        plan = [(small, args.rounds, True, mode) for mode in modes]
        plan += [(large, args.large_rounds, False, args.large_mode)] * (args.large_rounds > 0)
        for nodes, rounds, compare, mode in plan:
            print(f"deployment, {nodes} SuperNodes, {MODES[mode]} ... (load {os.getloadavg()[0]:.1f})", flush=True)
            # Staged anew: an executor runs only a FAB equal to the fedcl it found at its start.
            app = launch.stage_app(ROOT, work / "app")
            try:
                d = deploy(work, keys, data_files, app, nodes, rounds, compare=compare, mode=mode,
                           keep_logs=args.keep_logs, workload=workload)
            except (RuntimeError, TimeoutError, OSError, KeyError, ValueError) as error:
                logs = work / f"deploy-{nodes}-{mode}" / "logs"
                d = {"supernodes": nodes, "mode": mode, "kept_model": mode != "fresh", "error": str(error)[-2000:],
                     "errors": log_errors(logs) if (logs / "superlink.log").exists() else {}}
            result["deployments"].append({**d, "planned_rounds": rounds})
            save()
    result["load_after"] = os.getloadavg()
    result["total_seconds"] = time.time() - started
    save()
    print("\n".join(render(result)))
    print(result["verdict"])


if __name__ == "__main__":
    main()
