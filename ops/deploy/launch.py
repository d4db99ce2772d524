"""Start and stop the real Flower processes of a deployment on one machine.

These build the exact command lines the README and `docker/compose.yml` use,
and run them as child processes that can always be stopped again::

    files = DeployFiles(Path("deploy-keys"))
    link = start_superlink(files, port=9093, database=Path("state/superlink.db"), log=Path("logs/link.log"))
    write_connection(flwr_home, "fedcl", f"127.0.0.1:{9093}", files.ca_cert)
    register_node(files, "hospital-a", "fedcl", flwr_home)
    node = start_supernode(files, "hospital-a", superlink="127.0.0.1:9093", runtime_port=9101,
                           data_file=..., state_dir=..., partition_id=0, log=...)
    run_id = submit_run(app_dir, "fedcl", {"config": "/abs/deploy.toml"}, flwr_home)
    ...
    node.stop(); link.stop()

Every process starts in its own process group; `Launched.stop` snapshots the
whole tree first (the SuperLink starts a SuperExec in a new session, which
starts the ServerApp), then terminates each process by its id, then kills
what is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedcl.ops.deploy.certs import DeployFiles

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live beside python


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (another process may still take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def flwr_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The environment every Flower process gets: this venv first on PATH (the
    SuperLink and SuperNode start `flower-superexec` and the apps from PATH),
    no per-run `uv sync`, and the given FLWR_HOME."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def superlink_command(files: DeployFiles, *, host: str, port: int, database: Path) -> list[str]:
    """One port serves the Control, Fleet and ServerApp runtime APIs (Flower 1.42).
    flower-superlink runs through fedcl's wrapper, whose SQLite state waits longer for a
    lock (`fedcl.ops.deploy.superlink`)."""
    return ["python", "-m", "fedcl.ops.deploy.superlink", "--ssl-ca-certfile", str(files.ca_cert),
            "--ssl-certfile", str(files.server_cert), "--ssl-keyfile", str(files.server_key),
            "--database", str(database), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]


def coordinator_command(files: DeployFiles, *, database: Path, superlink: str, fleet: str,
                        control: str | None) -> list[str]:
    """`fedcl deploy coordinator`: the SuperLink on loopback (`superlink`), the Fleet API
    alone on the node-facing `fleet`, operators through mutual TLS on `control`."""
    command = ["fedcl", "deploy", "coordinator", f"--keys={files.root}", f"--database={database}",
               f"--superlink={superlink}", f"--fleet={fleet}"]
    return command + ([f"--control={control}"] if control else ["--no-control"])


def node_config(*, data_file: Path, state_dir: Path, partition_id: int, worker: Path | None = None) -> str:
    """`worker`: the node's worker socket (`fedcl.client.worker`), which keeps the model loaded."""
    text = f'data-file="{data_file}" state-dir="{state_dir}" partition-id={partition_id}'
    return text + (f' worker="{worker}"' if worker else "")


def worker_command(state_dir: Path) -> list[str]:
    """The node's long-lived worker, started next to its SuperNode (same user, same state folder)."""
    return ["python", "-m", "fedcl.client.worker", "--state-dir", str(state_dir)]


def executor_command(runtime_port: int) -> list[str]:
    """The node's long-lived ClientApp executor (`fedcl.client.executor`), serving the tasks of
    a SuperNode started with `--isolation process` on its Runtime API (127.0.0.1, plain HTTP)."""
    return ["python", "-m", "fedcl.client.executor", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--insecure"]


def supernode_command(files: DeployFiles, institution: str, *, superlink: str, runtime_port: int,
                      data_file: Path, state_dir: Path, partition_id: int,
                      root_certificates: Path | None = None, worker: Path | None = None,
                      isolation: str = "subprocess") -> list[str]:
    """`runtime_port`: the node's own ClientApp runtime API (127.0.0.1, default 9094), which
    must differ between SuperNodes sharing a machine. `isolation="process"`: the SuperNode
    starts no ClientApp processes; an executor serves its tasks (`executor_command`)."""
    return ["flower-supernode", "--superlink", superlink, *(["--isolation", isolation] if isolation != "subprocess" else []),
            "--root-certificates", str(root_certificates or files.ca_cert),
            "--auth-supernode-private-key", str(files.node_key(institution)),
            "--port", str(runtime_port),
            "--node-config", node_config(data_file=data_file, state_dir=state_dir,
                                         partition_id=partition_id, worker=worker)]


def write_connection(flwr_home: Path, name: str, address: str, ca_cert: Path) -> Path:
    """Add (or replace) `[superlink.<name>]` in `$FLWR_HOME/config.toml`, as the default."""
    import tomli_w  # ships with flwr

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    path = Path(flwr_home) / "config.toml"
    config = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    links = config.setdefault("superlink", {})
    links["default"] = name
    links[name] = {"address": address, "root-certificates": str(Path(ca_cert).resolve())}
    from fedcl.atomic import write_text

    write_text(path, tomli_w.dumps(config))
    return path


def flwr(args: list[str], flwr_home: Path, *, cwd: Path | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `flwr` CLI; raise with its output on failure."""
    done = subprocess.run([str(BIN / "flwr"), *args], env=flwr_env(flwr_home), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}):\n"
                           f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done


def register_node(files: DeployFiles, institution: str, connection: str, flwr_home: Path) -> str:
    """`flwr supernode register KEY.pub CONNECTION`; returns the CLI's output."""
    return flwr(["supernode", "register", str(files.node_public_key(institution)), connection],
                flwr_home).stdout


def run_config_arg(values: dict) -> str:
    """`--run-config` text: TOML values, space separated (strings quoted)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def submit_run(app_dir: Path, connection: str, run_config: dict, flwr_home: Path) -> int:
    """`flwr run APP CONNECTION --run-config ...`; returns the run id."""
    done = flwr(["run", str(app_dir), connection, "--run-config", run_config_arg(run_config),
                 "--format", "json"], flwr_home, cwd=app_dir)
    return int(json.loads(done.stdout)["run-id"])


def run_status(run_id: int, connection: str, flwr_home: Path) -> str:
    """The run's status as `flwr ls` reports it (e.g. "running", "finished:completed")."""
    done = flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], flwr_home)
    runs = json.loads(done.stdout).get("runs", [])
    return str(runs[0].get("status", "")) if runs else ""


def online_nodes(connection: str, flwr_home: Path) -> int:
    """How many SuperNodes `flwr supernode ls` reports online."""
    out = flwr(["supernode", "ls", connection, "--format", "json"], flwr_home).stdout
    return sum(1 for n in json.loads(out).get("nodes", []) if n.get("status") == "online")


def process_table() -> dict[int, dict]:
    """Every process now: pid -> {"ppid", "cmdline", "rss" (bytes), "cpu" (user and
    system seconds so far)}, in one pass over the process list, so that many trees can
    be read from the same moment."""
    import psutil

    table = {}
    for p in psutil.process_iter(["ppid", "cmdline", "memory_info", "cpu_times"]):
        mem, cpu = p.info.get("memory_info"), p.info.get("cpu_times")
        table[p.pid] = {"ppid": p.info.get("ppid"), "cmdline": p.info.get("cmdline") or [],
                        "rss": mem.rss if mem else 0, "cpu": cpu.user + cpu.system if cpu else 0.0}
    return table


def process_tree(root: int, table: dict[int, dict]) -> set[int]:
    """`root`'s descendants in `table`: its children, and the processes that name it
    with `--parent-pid` (a SuperExec runs in its own session, and is re-parented if
    ours died first), transitively."""
    kids: dict[int, set[int]] = {}
    for pid, p in table.items():
        cmd = p["cmdline"]
        parents = {p["ppid"]}
        if "--parent-pid" in cmd[:-1]:
            value = cmd[cmd.index("--parent-pid") + 1]
            parents.add(int(value) if value.isdigit() else None)
        for parent in parents - {None, pid}:
            kids.setdefault(parent, set()).add(pid)
    found, todo = set(), [root]
    while todo:
        for pid in kids.get(todo.pop(), ()):
            if pid not in found and pid != root:
                found.add(pid)
                todo.append(pid)
    return found


@dataclass
class Launched:
    """A started process with its log; `stop()` ends it and everything it started."""

    name: str
    proc: subprocess.Popen
    log: Path
    known: set[int] = field(default_factory=set)  # descendants seen so far
    companions: list["Launched"] = field(default_factory=list)  # stopped with it (a node's worker)
    born: dict[int, float] = field(default_factory=dict)  # their start times, when first seen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def descendants(self) -> set[int]:
        """Child processes now alive, remembered so that a later stop still finds them
        after their parent has gone."""
        import psutil

        for pid in process_tree(self.pid, process_table()) - self.known:
            try:
                self.born[pid] = psutil.Process(pid).create_time()
            except psutil.NoSuchProcess:
                continue
            self.known.add(pid)
        return self.known

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, *, kill: bool = False, grace: float = 5.0) -> None:
        """SIGTERM (SIGKILL with kill=True) the process and its descendants, by id."""
        import psutil

        for companion in self.companions:
            companion.stop(kill=kill, grace=grace)
        tree = [self.pid, *sorted(self.descendants())]
        procs = []
        for pid in tree:
            try:
                p = psutil.Process(pid)
                # A descendant that died may have left its pid to an unrelated process,
                # which started at another time than the one we saw.
                if pid != self.pid and abs(p.create_time() - self.born.get(pid, p.create_time())) > 0.01:
                    continue
                procs.append(p)
                p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


def launch(name: str, command: list[str], *, log: Path, flwr_home: Path | None = None,
           cwd: Path | None = None) -> Launched:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(BIN / command[0]), *command[1:]], stdout=out,
                                stderr=subprocess.STDOUT, env=flwr_env(flwr_home), cwd=cwd,
                                start_new_session=True)
    return Launched(name, proc, log)


def start_superlink(files: DeployFiles, *, port: int, database: Path, log: Path,
                    host: str = "127.0.0.1", flwr_home: Path | None = None,
                    cwd: Path | None = None) -> Launched:
    database.parent.mkdir(parents=True, exist_ok=True)
    link = launch("superlink", superlink_command(files, host=host, port=port, database=database),
                  log=log, flwr_home=flwr_home, cwd=cwd)
    wait_for(lambda: _port_open(host, port), timeout=60, what=f"SuperLink on {host}:{port}",
             process=link)
    return link


def start_coordinator(files: DeployFiles, *, database: Path, log: Path, superlink: str,
                      fleet: str, control: str | None, flwr_home: Path | None = None) -> Launched:
    """`coordinator_command` as a child; returns once the SuperLink and both doors listen."""
    database.parent.mkdir(parents=True, exist_ok=True)
    proc = launch("coordinator", coordinator_command(files, database=database, superlink=superlink,
                                                     fleet=fleet, control=control),
                  log=log, flwr_home=flwr_home)
    for address in (superlink, fleet, *([control] if control else [])):
        host, _, port = address.rpartition(":")
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        wait_for(lambda: _port_open(host, int(port)), timeout=60, what=f"coordinator on {address}",
                 process=proc)
    return proc


def start_supernode(files: DeployFiles, institution: str, *, superlink: str, runtime_port: int,
                    data_file: Path, state_dir: Path, partition_id: int, log: Path,
                    flwr_home: Path | None = None, root_certificates: Path | None = None,
                    worker: bool = False, executor: bool = False) -> Launched:
    """`worker`: start the node's worker first (log: `<log>-worker.log`), which keeps the
    model loaded between messages; the SuperNode's ClientApps hand it each message.
    `executor`: the SuperNode in `--isolation process`, with one long-lived executor
    (log: `<log>-executor.log`) running every ClientApp message instead of a process
    each. Both are stopped with the SuperNode."""
    state_dir.mkdir(parents=True, exist_ok=True)
    companion, socket_file = None, None
    if worker:
        from fedcl.client.worker import socket_path

        socket_file = socket_path(state_dir)
        companion = launch(f"{institution}-worker", worker_command(state_dir),
                           log=log.with_name(f"{log.stem}-worker.log"), flwr_home=flwr_home)
        wait_for(socket_file.exists, timeout=60, what=f"{institution}'s worker socket", process=companion,
                 interval=0.2)
    command = supernode_command(files, institution, superlink=superlink, runtime_port=runtime_port,
                                data_file=data_file, state_dir=state_dir, partition_id=partition_id,
                                root_certificates=root_certificates, worker=socket_file,
                                isolation="process" if executor else "subprocess")
    # flower-supernode itself, with a SuperLink's transient HTTP 500 retried (fedcl.ops.deploy.supernode).
    node = launch(institution, ["python", "-m", "fedcl.ops.deploy.supernode", *command[1:]], log=log,
                  flwr_home=flwr_home)
    if companion is not None:
        node.companions.append(companion)
    if executor:
        wait_for(lambda: _port_open("127.0.0.1", runtime_port), timeout=60,
                 what=f"{institution}'s Runtime API on port {runtime_port}", process=node, interval=0.2)
        node.companions.append(launch(f"{institution}-executor", executor_command(runtime_port),
                                      log=log.with_name(f"{log.stem}-executor.log"), flwr_home=flwr_home))
    return node


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str,
             process: Launched | None = None, interval: float = 0.5) -> None:
    """Poll `condition` until true; fail early if `process` died, with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited ({process.proc.returncode}) while waiting "
                               f"for {what}:\n{process.tail()}")
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


APP_PACKAGES = ("fedcl", "continual", "federation", "strategies", "client", "server", "ops")


APP_MARK = ".fedcl-staged-app"  # no FAB pattern matches it, so it never enters the bundle


class StageError(ValueError):
    """The folder to stage the app into holds something fedcl did not put there."""


def stage_app(source: Path, target: Path, *, overwrite: bool = False) -> Path:
    """Copy what the Flower app bundle needs (pyproject.toml and the packages' .py
    files) into `target`, so that `flwr run target` builds its FAB without walking
    `.venv/`, `runs/` or data (`flwr run .` in the repository works too, slower).

    `target` may be absent, empty, or a folder this function staged before (its
    mark file): that is replaced. Any other folder is refused unless `overwrite`."""
    import shutil

    source, target = Path(source), Path(target)
    if not (source / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{source}: no pyproject.toml (not the fedcl repository)")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise StageError(f"--out {target}: exists and is not a folder; choose another --out")
    if target.exists() and any(target.iterdir()):
        if not overwrite and not (target / APP_MARK).is_file():
            raise StageError(f"--out {target}: a folder fedcl did not stage, and not empty; "
                             "choose a new or empty folder, or pass --overwrite to replace "
                             "everything in it")
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / APP_MARK).write_text(f"staged by fedcl from {source.resolve()}\n", encoding="utf-8")
    shutil.copy2(source / "pyproject.toml", target / "pyproject.toml")
    for package in APP_PACKAGES:
        for path in (source / package).rglob("*.py"):
            if "__pycache__" not in path.parts:
                dest = target / path.relative_to(source)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
    return target


def run_on_federation(config, *, connection: str, app_dir: Path, flwr_home: Path | None = None,
                      poll: float = 5.0, log: Callable[[str], None] = print) -> str:
    """Submit `config` as a run to a deployed federation and wait for it to end; return its status.

    The resolved config is written next to the run folder as TOML (the run
    config only carries `config` and the keys pyproject declares), submitted
    with `flwr run`, and followed with `flwr ls` while the run folder's
    checkpoint shows the rounds as they commit.
    """
    from fedcl.atomic import write_text

    home = flwr_home or Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    out = Path(config.run.out_dir)
    toml = out.parent / f"{out.name}.toml"
    write_text(toml, config.to_toml())
    run_id = submit_run(app_dir, connection, {"config": str(toml), "run.out_dir": str(out),
                                              "federation.rounds": config.federation.rounds}, home)
    log(f"run {run_id} submitted to {connection}; waiting for {config.federation.rounds} rounds")
    seen, status = -1, ""
    while True:
        status = run_status(run_id, connection, home)
        checkpoint = out / "checkpoint.json"
        done = json.loads(checkpoint.read_text())["round"] if checkpoint.exists() else 0
        if done != seen:
            log(f"run {run_id}: round {done} of {config.federation.rounds} committed ({status})")
            seen = done
        if status.startswith("finished"):
            return status
        time.sleep(poll)
