"""One round's wall time under the old and the new thread choice, with and without a busy process.

    .venv/bin/python -m bench.threads            # SmolLM2-135M, 2 clients + the server
    .venv/bin/python -m bench.threads --quick    # tiny-llama, to check the script

A round as the simulation runs it on this machine, in separate processes
started together: two clients each train `STEPS` steps (Ray runs both at once
with federation.client_cpus = 1) while the server evaluates `EVAL` test
records (as the server's first evaluation overlaps the clients' start). Each
process loads everything, signals ready, and starts its clock when all are
ready; the round's wall time is the slowest process. Thread choices:

- old: clients min(client_cpus, cores) = 1, the server every core;
- new: `fedcl.plan.thread_plan` (`fedcl.session.configure_threads`).

"busy" adds one more process spinning a CPU core (a Python loop) for the
whole round, as another job on the machine would. Results are written after
every run to bench/results/threads.json, with the load average at the start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
STEPS, EVAL = 3, 64
SETTINGS = ["model.device=cpu", "federation.clients=2", "federation.client_cpus=1", "train.batch_size=8",
            "model.max_length=64", f"train.local_steps={STEPS}", f"data.max_test_records={EVAL}",
            "data.max_records=400", "train.eval_batch_size=16", "train.seed=0"]


def old_threads(config, server: bool) -> int:
    """The rule before `thread_plan`: a client what the engine gives it, the server every core."""
    cores = os.cpu_count() or 1
    return config.model.threads or (cores if server else min(config.federation.client_cpus, cores))


def worker(role: str, rule: str, model: str, go: str) -> dict:
    import torch

    from fedcl.config import load_config
    from fedcl.session import GlobalEvaluator, LocalSession, configure_threads

    config = load_config(None, SETTINGS + [f"model.name={model}"])
    server = role == "server"
    node = GlobalEvaluator(config) if server else LocalSession(config, int(role[-1]), 2)
    if rule == "old":
        torch.set_num_threads(old_threads(config, server))
    else:
        configure_threads(config, server=server)
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.05)
    start = time.perf_counter()
    if server:
        node.evaluate(node.initial_state)
    else:
        node.train(node.shared.initial_state, 1)
    return {"role": role, "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - start, 2)}


def run_round(rule: str, busy: bool, model: str) -> dict:
    # torch.set_num_threads decides in each process; no OMP/MKL variable pins it
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    go = Path(tempfile.mkdtemp(prefix="fedcl-threads-")) / "go"
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    procs = [subprocess.Popen([sys.executable, "-m", "bench.threads", "--worker", role, rule, model, str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
             for role in ("server", "client0", "client1")]
    try:
        for proc in procs:
            while (line := proc.stdout.readline()) and line.strip() != "ready":
                pass
        load = os.getloadavg()[0]
        go.touch()
        rows = [json.loads(proc.stdout.read().strip().splitlines()[-1]) for proc in procs]
    finally:
        for proc in procs:
            proc.wait()
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return {"rule": rule, "busy_process": busy, "load_average_1min": round(load, 2),
            "round_seconds": max(r["seconds"] for r in rows), "processes": rows}


def render(rows: list[dict]) -> list[str]:
    lines = ["| threads (server, clients) | busy process | server eval s | client train s | round s | load avg |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        by = {p["role"]: p for p in r["processes"]}
        lines.append(f"| {r['rule']} ({by['server']['threads']}, {by['client0']['threads']}) | "
                     f"{'yes' if r['busy_process'] else 'no'} | {by['server']['seconds']} | "
                     f"{max(by['client0']['seconds'], by['client1']['seconds'])} | {r['round_seconds']} | "
                     f"{r['load_average_1min']} |")
    return lines


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*sys.argv[2:6])))
        return
    quick = "--quick" in sys.argv
    model = "tiny-llama" if quick else "smollm2-135m"
    path = RESULTS / ("threads_quick.json" if quick else "threads.json")
    result = {"how": "python -m bench.threads: server evaluation and two clients' training in three processes "
                     "started together; round = the slowest", "model": model, "settings": SETTINGS,
              "cores": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    for busy in (False, True):
        for rule in ("old", "new"):
            result["rows"].append(run_round(rule, busy, model))
            print(render(result["rows"][-1:])[-1], flush=True)
            RESULTS.mkdir(exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")  # kept after every run
    print("\n".join(render(result["rows"])))


if __name__ == "__main__":
    main()
