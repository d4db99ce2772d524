"""The compose federation end to end: docker/compose.yml brought up on host networking,
one run of the tiny model with DP-SGD, an institution container killed mid-round and
started again, then checks of the run, of the node's privacy ledger, and that no
secret of the build is in the images; every container and volume made is removed.

Run by docker/e2e.sh (`make docker-e2e`) after docker/build.sh::

    .venv/bin/python docker/e2e.py --work docker/.e2e/run --timings docker/.e2e/build.json \
        --out bench/results/docker.json

The flwr CLI and the key/data preparation run here, with this checkout's fedcl; the
SuperLink, the ServerApp and the SuperNodes run in the images.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
INSTITUTIONS = ["hospital-a", "hospital-b", "hospital-c"]
LABELS = ["Acne", "Birth Control", "Depression", "Pain"]
CONNECTION = "fedcl-docker"
# compose.yml's addresses, all on this host's loopback (host networking): flower-superlink
# itself (9091, where an operator on the host points flwr), the operators' control proxy
# (9092), the nodes' Fleet gateway (9093), each node's own runtime API (9094-9096).
LINK = "127.0.0.1:9091"
PORTS = (9091, 9092, 9093, 9094, 9095, 9096)
RUN_DIR = "/runs/e2e"  # in the coordinator's `runs` volume
APP_UID = 10001  # the images' `fedcl` user, which must read the mounted keys


def log(message: str) -> None:
    print(f"[docker-e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(*args: str, check: bool = True, timeout: float = 300, env: dict | None = None) -> str:
    done = subprocess.run(list(args), check=False, capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout


class Compose:
    """docker-compose on docker/compose.yml under one project name, with this run's folders."""

    def __init__(self, project: str, work: Path):
        self.project = project
        self.env = {**os.environ, "FEDCL_KEYS": str(work / "keys"), "FEDCL_DATA": str(work / "data"),
                    "FEDCL_SERVER_DATA": str(work / "server-data")}
        self.base = ["docker-compose", "-p", project, "-f", str(HERE / "compose.yml")]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        return sh(*self.base, *args, check=check, timeout=timeout, env=self.env)

    def container(self, service: str) -> str:
        cid = self("ps", "-q", service).strip()
        if not cid:
            raise RuntimeError(f"no container for service {service} in project {self.project}")
        return cid

    def leftovers(self) -> dict[str, list[str]]:
        """What the engine still holds of this project, by kind."""
        label = f"label=com.docker.compose.project={self.project}"
        return {kind: sh("docker", *cmd, "--filter", label, "-q").split()
                for kind, cmd in (("containers", ["ps", "-a"]), ("volumes", ["volume", "ls"]),
                                  ("networks", ["network", "ls"]))}

    def down(self) -> dict[str, list[str]]:
        self("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False, timeout=180)
        left = self.leftovers()
        for cid in left["containers"]:
            sh("docker", "rm", "-f", "-v", cid, check=False)
        for vol in left["volumes"]:
            sh("docker", "volume", "rm", "-f", vol, check=False)
        for net in left["networks"]:
            sh("docker", "network", "rm", net, check=False)
        return self.leftovers()


def prepare(work: Path) -> None:
    """Keys (readable by the images' user, still 0600), each node's data, the coordinator's."""
    from fedcl import data
    from fedcl.config import Config
    from fedcl.ops.deploy.certs import generate_certs

    generate_certs(work / "keys", INSTITUTIONS)
    for path in [work / "keys", *(work / "keys").rglob("*")]:
        os.chown(path, APP_UID, APP_UID)
    dataset = data.load_dataset(Config().data, seed=0)
    (work / "data").mkdir()
    (work / "server-data").mkdir()
    for i, name in enumerate(INSTITUTIONS):
        rows = dataset.train[i::3][:16]
        (work / "data" / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))
    (work / "server-data" / "server.jsonl").write_text(
        "".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in dataset.test[:24]))


def run_config(rounds: int, timeout: int) -> dict:
    """The run's settings, all on `flwr run --run-config` (pyproject declares every key):
    a TOML file named by `config` would have to exist at the same path on every node.
    min_replies 2: the round with the killed node still counts, with the other two."""
    return {"config": "", "model.name": "tiny-llama", "data.path": "/server-data/server.jsonl",
            "data.labels": ",".join(LABELS), "data.max_records": 16, "train.batch_size": 4,
            "train.local_steps": 2, "federation.clients": 3, "federation.min_replies": 2,
            "federation.rounds": rounds, "federation.timeout": timeout,
            "privacy.target_epsilon": 8.0, "run.out_dir": RUN_DIR}


def checkpoint_round(compose: Compose) -> int:
    out = sh("docker", "exec", compose.container("superlink"), "cat", f"{RUN_DIR}/checkpoint.json",
             check=False)
    try:
        return int(json.loads(out)["round"])
    except (ValueError, KeyError, TypeError):
        return 0


def container_log(cid: str) -> str:
    done = subprocess.run(["docker", "logs", cid], check=False, capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def received_train(cid: str) -> int:
    """How many train messages the SuperNode in the container has logged receiving."""
    return container_log(cid).count("Receiving: train message")


def wait(condition, *, timeout: float, what: str, interval: float = 2.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if condition():
            return time.monotonic() - t0
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def check_no_secrets(images: list[str], base: str = "fedcl-base:bookworm") -> dict:
    """The host's pip configuration files, the wheelhouse, and the CA certificates this
    machine adds to Debian's stock bundle (the host's bundle less the base image's) must
    not be in any image: file system or history."""
    pip_files = [line.split(",")[0].strip() for line in sh(sys.executable, "-m", "pip", "config", "debug").splitlines()
                 if line.strip().endswith("exists: True")]
    blocks = lambda text: {b.strip() for b in text.split("-----END CERTIFICATE-----") if "BEGIN" in b}
    bundle_of = lambda image: sh("docker", "run", "--rm", "--network", "none", "--entrypoint", "cat", image,
                                 "/etc/ssl/certs/ca-certificates.crt")
    local_only = blocks(Path("/etc/ssl/certs/ca-certificates.crt").read_text()) - blocks(bundle_of(base))
    report = {"pip_config_files": pip_files, "host_only_cas": len(local_only)}
    for image in images:
        found = sh("docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
                   "for f in " + " ".join(pip_files) + " /root/.config/pip/pip.conf /wheels /tmp/fedcl;"
                   " do test -e $f && echo $f; done; true").split()
        found += [f"host CA #{i}" for i, cert in enumerate(sorted(local_only)) if cert in blocks(bundle_of(image))]
        history = sh("docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
        found += [f"history mentions {w}" for w in ("pip.conf", "ca-certificates.crt", "PIP_CERT") if w in history]
        if found:
            raise RuntimeError(f"{image}: build secrets or wheels baked in: {found}")
        report[image] = {"found": found}
    return report


def run_federation(compose: Compose, work: Path, args) -> dict:
    """Up, a run with one node killed and restarted, then the checks; committed as version
    v0001 of an adapter registry the way `fedcl update --deployment` commits one."""
    sys.path.insert(0, str(REPO))
    from fedcl.config import Config
    from fedcl.ops.update import run_deployed_update

    home, result = bring_up(compose, work)
    settings = run_config(args.rounds, args.timeout)
    # The registry job's config: the run's settings, the coordinator's evaluation file as this
    # host sees it (its fingerprint is the version's "test" one).
    base = Config().replace({**{k: v for k, v in settings.items() if k != "config"},
                             "data.path": str(work / "server-data" / "server.jsonl")}, source="docker e2e")

    def submit(config) -> None:  # run_deployed_update's federation: the containers'
        result.update(run_with_a_kill(compose, home, work, settings, args))
        target = Path(config.run.out_dir)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        sh("docker", "cp", f"{compose.container('superlink')}:{RUN_DIR}", str(target))

    record = run_deployed_update(base, work / "registry", submit=submit, log=log)
    result.update(check_nodes(compose, work, result["replies_by_round"], args.rounds))
    result["registry"] = check_registry(record, work, base, args.rounds)
    return result


def bring_up(compose: Compose, work: Path) -> tuple[Path, dict]:
    from fedcl.ops.deploy import launch as L
    from fedcl.ops.deploy.certs import DeployFiles

    files, home = DeployFiles(work / "keys"), work / "flwr-home"
    home.mkdir()
    t0 = time.monotonic()
    compose("up", "-d", "superlink")
    wait(lambda: all(L._port_open("127.0.0.1", p) for p in PORTS[:3]), timeout=180,
         what=f"the coordinator on 127.0.0.1:{PORTS[:3]}")
    L.write_connection(home, CONNECTION, LINK, files.ca_cert)
    for name in INSTITUTIONS:
        L.register_node(files, name, CONNECTION, home)
    compose("up", "-d", timeout=600)
    up = wait(lambda: L.online_nodes(CONNECTION, home) == 3, timeout=180,
              what="three SuperNodes online") + time.monotonic() - t0
    log(f"SuperLink and three institutions up in {up:.0f} s")
    return home, {"up_s": up}


def run_with_a_kill(compose: Compose, home: Path, work: Path, settings: dict, args) -> dict:
    """Submit the run, `docker kill` --kill once its train message of --kill-round arrived,
    `docker start` it 5 s later, wait for the run to finish; check its metrics."""
    from fedcl.ops.deploy import launch as L

    app = L.stage_app(REPO, work / "app")
    started = time.monotonic()
    load_at_submit = os.getloadavg()[0]
    run_id = L.submit_run(app, CONNECTION, settings, home)
    log(f"run {run_id} submitted: {args.rounds} rounds")
    victim = compose.container(args.kill)
    wait(lambda: checkpoint_round(compose) >= args.kill_round - 1, timeout=args.run_timeout,
         what=f"round {args.kill_round - 1} to commit")
    wait(lambda: received_train(victim) >= args.kill_round, timeout=args.run_timeout,
         what=f"{args.kill} receiving round {args.kill_round}", interval=1.0)
    sh("docker", "kill", victim)
    killed_in = checkpoint_round(compose) + 1
    log(f"killed {args.kill} ({victim[:12]}) in round {killed_in}")
    time.sleep(5)
    state = sh("docker", "inspect", "--format", "{{.State.Status}}", victim).strip()
    sh("docker", "start", victim)
    log(f"{args.kill} was {state}; started it again")

    status = ""
    while not status.startswith("finished"):
        if time.monotonic() - started > args.run_timeout:
            raise TimeoutError(f"run {run_id} not finished after {args.run_timeout} s")
        time.sleep(5)
        status = L.run_status(run_id, CONNECTION, home)
    run_s = time.monotonic() - started
    log(f"run {run_id}: {status} in {run_s:.0f} s")

    link = compose.container("superlink")
    metrics = json.loads(sh("docker", "exec", link, "cat", f"{RUN_DIR}/metrics.json"))
    rounds = [r["round"] for r in metrics["rounds"]]
    ids = [sorted(c["id"] for c in r["clients"]) for r in metrics["rounds"]]
    if status != "finished:completed" or rounds != list(range(1, args.rounds + 1)):
        raise RuntimeError(f"run {run_id}: status {status}, rounds {rounds}")
    if any(len(i) < 2 for i in ids) or ids[-1] != [0, 1, 2]:
        raise RuntimeError(f"replies by round {ids}: expected at least two, and all three in the "
                           f"last round after {args.kill} came back")
    sh("docker", "exec", link, "test", "-f", f"{RUN_DIR}/adapters/round-{args.rounds}/adapter_model.safetensors")
    return {"run_id": run_id, "status": status, "rounds": args.rounds, "killed": args.kill,
            "killed_in_round": killed_in, "replies_by_round": ids,
            "round_seconds": [r.get("round_seconds") for r in metrics["rounds"]], "run_s": run_s,
            "load_1min_during_run": [load_at_submit, os.getloadavg()[0]]}  # at submit, at the end


def check_nodes(compose: Compose, work: Path, ids: list[list[int]], rounds: int) -> dict:
    """Each node's ledger (out of its state volume, through the checked loader) charges every
    round it replied in; its worker handled its messages."""
    from fedcl.privacy.ledger import LEDGER_FILE, PrivacyLedger

    ledgers, workers = {}, {}
    for i, name in enumerate(INSTITUTIONS):
        target = work / "state" / name
        target.parent.mkdir(exist_ok=True)
        sh("docker", "cp", f"{compose.container(name)}:/state", str(target))
        found = sorted(target.rglob(LEDGER_FILE))
        if not found:
            raise RuntimeError(f"{name}: no {LEDGER_FILE} in its state volume")
        ledger = PrivacyLedger.load(found[0])
        charged = sorted(e["round"] for e in ledger.entries)
        ledgers[name] = {"entries": len(ledger.entries), "rounds": charged,
                         "epsilon": ledger.entries[-1]["epsilon"] if ledger.entries else 0.0}
        replied = [r for r, got in zip(range(1, rounds + 1), ids) if i in got]
        if not set(replied) <= set(charged):
            raise RuntimeError(f"{name}: replied in rounds {replied} but its ledger charges {charged}")
        workers[name] = worker_messages(target / "worker.log", compose.container(name), len(replied))
    log(f"ledgers load and cover every reply: {ledgers}")
    log(f"every message handled by the node's worker: {workers}")
    return {"ledgers": ledgers, "workers": workers}


def check_registry(record: dict, work: Path, base, rounds: int) -> dict:
    """The committed version: every round, the epsilon spent, and each node's fingerprint
    equal to that of the file this host wrote for it (no data left the nodes, only hashes)."""
    from fedcl import data

    want = {f"node {i}": data.fingerprint(data.load_records(str(work / "data" / f"{name}.jsonl"), base.data))
            for i, name in enumerate(INSTITUTIONS)}
    got = {k: v for k, v in record["data_fingerprints"].items() if k.startswith("node ")}
    if record["version"] != "v0001" or record["rounds"] != rounds or got != want:
        raise RuntimeError(f"registry version {record.get('version')}: rounds {record.get('rounds')} "
                           f"(want {rounds}), node fingerprints {got} (want {want})")
    log(f"registry {record['version']}: {rounds} rounds, epsilon {record['epsilon']}, "
        "each node's data fingerprint matches its file")
    return {"version": record["version"], "rounds": record["rounds"], "epsilon": record["epsilon"],
            "metrics_new": record["metrics"]["new"]}


def worker_messages(log_file: Path, cid: str, replies: int) -> dict:
    """The node's worker (`fedcl deploy node`) handled its messages: at least one train line
    per reply in its log (/state/worker.log), and no ClientApp of the node fell back to
    loading the model itself."""
    # "node worker | run R | train | message M | 3.21 s" (client/worker.py's line per message)
    lines = re.findall(r"^node worker \| run \S+ \| (\w+) \| message \S+ \| ([\d.]+) s$",
                       log_file.read_text(), flags=re.MULTILINE)
    seconds = {kind: [float(t) for k, t in lines if k == kind] for kind in ("train", "evaluate")}
    fallbacks = container_log(cid).count("not reachable after")
    if len(seconds["train"]) < replies or fallbacks:
        raise RuntimeError(f"{log_file}: {len(seconds['train'])} train messages for {replies} replies, "
                           f"{fallbacks} ClientApps without the worker")
    return {kind: {"messages": len(v), "max_s": max(v, default=0.0)} for kind, v in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="a new folder for this run's keys, data, logs")
    p.add_argument("--timings", type=Path, help="docker/build.sh's JSON, merged into --out")
    p.add_argument("--out", type=Path, help="write the results here (bench/results/docker.json)")
    # Four: the killed institution is back within a round or two (container start, model
    # load), and must be counted in the last.
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--kill-round", type=int, default=1, help="the round in which --kill is killed")
    # A round with a killed node waits this long for the reply it will not get; on 2 shared
    # cores a round's messages alone took over 2.5 minutes to arrive (tiny model, 3 nodes).
    p.add_argument("--timeout", type=int, default=420, help="federation.timeout, seconds")
    p.add_argument("--run-timeout", type=int, default=1800)
    p.add_argument("--kill", default="hospital-b", choices=INSTITUTIONS)
    p.add_argument("--project", default=f"fedcl-e2e-{os.getpid()}")
    args = p.parse_args(argv)
    if not 1 <= args.kill_round < args.rounds:
        p.error(f"--kill-round {args.kill_round}: must be 1 to --rounds - 1 ({args.rounds - 1}), "
                "so that a later round shows the node back")
    busy = [port for port in PORTS if not _free(port)]
    if busy:
        p.error(f"ports {busy} on 127.0.0.1 are taken; compose.yml's services use {list(PORTS)}")
    if args.work.exists() and any(args.work.iterdir()):
        p.error(f"--work {args.work}: not empty; give a new folder")
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work)
    compose = Compose(args.project, args.work)
    # SIGTERM (a test's timeout, `kill`) ends the run through the clean-up below too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result, error, left = {}, None, {}
    try:
        result = run_federation(compose, args.work, args)
        result["secrets"] = check_no_secrets(["fedcl-coordinator:latest", "fedcl-institution:latest"])
    except Exception as err:  # noqa: BLE001 - reported with the logs, then cleaned up
        error = err
        for service in ["superlink", *INSTITUTIONS]:
            print(f"--- {service} (last lines)\n{compose('logs', '--tail', '40', service, check=False)}")
    finally:  # also on SIGTERM / Ctrl-C, which end the run right after this
        save_logs(compose, args.work / "logs")
        left = compose.down()
        shutil.rmtree(args.work / "keys", ignore_errors=True)  # private keys: not kept
        if any(left.values()):
            print(f"left behind: {left}", file=sys.stderr)
        else:
            log(f"project {args.project}: no container, volume or network left")
    if any(left.values()):
        return 1
    if error is not None:
        print(f"docker e2e failed: {error}", file=sys.stderr)
        return 1
    if args.out:
        build = json.loads(args.timings.read_text()) if args.timings and args.timings.exists() else {}
        write_result(args.out, {"build": build, "e2e": result})
    return 0


def save_logs(compose: Compose, folder: Path) -> None:
    """Every service's whole log (both lives of the killed one) into the run's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for service in ["superlink", *INSTITUTIONS]:
        try:
            (folder / f"{service}.log").write_text(compose("logs", "--no-color", service, check=False))
        except (OSError, subprocess.SubprocessError) as err:  # the clean-up must still run
            print(f"logs of {service} not saved: {err}", file=sys.stderr)


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def write_result(path: Path, result: dict) -> None:
    from fedcl.atomic import write_text

    result["machine"] = {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0],
                         "docker": sh("docker", "version", "--format", "{{.Server.Version}}").strip(),
                         "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:  # earlier runs kept under their own keys stay; this run's replace the last run's
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = {}
    kept = {k: v for k, v in earlier.items() if k not in result} if isinstance(earlier, dict) else {}
    write_text(path, json.dumps({**result, **kept}, indent=1) + "\n")
    log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
