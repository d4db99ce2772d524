"""`fedcl deploy node`: an institution's node, its long-lived worker next to its SuperNode.

    fedcl deploy node -- --superlink HOST:PORT --root-certificates ca.crt \\
        --auth-supernode-private-key node.key --port 9094 \\
        --node-config 'data-file="/data/a.jsonl" state-dir="/state" partition-id=0'

Everything after `--` is flower-supernode's own flags. Flower's SuperNode starts a
fresh ClientApp process for every message; on a loaded machine importing torch and
loading the model there outlasted Flower's 30 s task heartbeat. So this command:

1. starts the node's worker (`python -m fedcl.client.worker --state-dir DIR`, DIR the
   node config's `state-dir`), which keeps the model loaded, and waits for its socket
   (DIR/worker.sock; its log: DIR/worker.log unless --worker-log);
2. runs flower-supernode through fedcl's wrapper (`fedcl.ops.deploy.supernode`: a
   SuperLink's HTTP 500 retried, Flower's fixed waits shortened) with `worker="DIR/worker.sock"` added to the node
   config, so the ClientApp forwards each message to the worker and imports no torch;
3. forwards SIGTERM/SIGINT to both, stops the worker when the SuperNode exits (and the
   SuperNode when the worker dies: a node without its worker would load the model per
   message again), and exits with the SuperNode's code.

With `--executor`, the SuperNode runs in `--isolation process` and starts no process per
message: one long-lived `python -m fedcl.client.executor` (log: DIR/executor.log unless
--executor-log) serves every message on its Runtime API (`--port`, 127.0.0.1), and is
stopped with it like the worker. An executor that dies is started again (at most
`RESTARTS` times in `RESTART_WINDOW` seconds) while the SuperNode stays up.

The institution image's entrypoint (docker/institution.Dockerfile) is this command.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedcl import keys

STOP_WAIT = 40.0  # the worker's supervisor itself waits up to 30 s for its serving child


class NodeError(ValueError):
    """Bad flags for `fedcl deploy node`, or its worker did not come up; says which."""


RESTARTS = 5           # an executor that dies is started again, at most this often ...
RESTART_WINDOW = 600.0  # ... within this many seconds; past that the node stops, loudly


@dataclass
class Companion:
    """A process the node runs next to its SuperNode, stopped with it. With `restart`, one
    that dies is started again (`restart()` gives the new process) instead of ending the node."""

    name: str
    proc: subprocess.Popen
    log: Path
    restart: Callable[[], subprocess.Popen] | None = None
    restarts: list[float] = field(default_factory=list)

    def may_restart(self, now: float) -> bool:
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW]
        return self.restart is not None and len(self.restarts) < RESTARTS


def node_flags(supernode_flags: list[str]) -> tuple[list[str], Path]:
    """flower-supernode's flags with `worker=<socket>` added to the node config, and the
    node's state folder (the node config's `state-dir`)."""
    from flwr.common.config import parse_config_args

    from fedcl.client.worker import socket_path

    where = [i for i, flag in enumerate(supernode_flags)
             if flag == "--node-config" or flag.startswith("--node-config=")]
    if len(where) != 1:
        raise NodeError(f"flower-supernode flags {shlex.join(supernode_flags) or '(none)'}: need exactly one "
                        f"--node-config (found {len(where)}), e.g. -- --node-config "
                        "'state-dir=\"/state\" data-file=\"/data/a.jsonl\" partition-id=0'")
    i = where[0]
    flags = list(supernode_flags)
    if flags[i] == "--node-config":
        if i + 1 == len(flags):
            raise NodeError("--node-config: no value follows it")
        flags[i:i + 2] = [f"--node-config={flags[i + 1]}"]
    text = flags[i].split("=", 1)[1]
    if text.strip().endswith(".toml"):
        raise NodeError(f"--node-config {text}: a TOML file; give the node config as key=value pairs, "
                        "so that the worker's socket can be added to it")
    config = parse_config_args([text])
    state_dir = config.get(keys.NODE_STATE_DIR)
    if not isinstance(state_dir, str) or not state_dir:
        raise NodeError(f"--node-config {text!r}: no {keys.NODE_STATE_DIR}; the worker needs the node's "
                        f'state folder, e.g. {keys.NODE_STATE_DIR}="/state"')
    sock = socket_path(state_dir)
    named = config.get(keys.NODE_WORKER)
    if named not in (None, str(sock)):
        raise NodeError(f"--node-config names {keys.NODE_WORKER}={named!r}, but this command starts the "
                        f"node's worker at {sock}; leave {keys.NODE_WORKER} out (it is added)")
    if named is None:
        flags[i] += f' {keys.NODE_WORKER}="{sock}"'
    return flags, Path(state_dir)


def start_worker(state_dir: Path, *, log: Path, timeout: float) -> Companion:
    """The node's worker supervisor (`fedcl.client.worker`); returns once its socket is bound."""
    from fedcl.client.worker import socket_path
    from fedcl.ops.deploy.launch import worker_command

    sock = socket_path(state_dir)
    stale = _identity(sock)  # a socket left by a killed node: bound again, a new file
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, *worker_command(state_dir)[1:]], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while _identity(sock) in (None, stale):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited ({proc.returncode})" if proc.poll() is not None else f"no socket after {timeout:.0f} s"
            stop(proc)
            raise NodeError(f"node worker for {state_dir}: {why}; see its log {log}:\n{_tail(log)}")
        time.sleep(0.2)
    print(f"fedcl deploy node: node worker {proc.pid} on {sock} (log: {log})", flush=True)
    return Companion("node worker", proc, log)


def executor_flags(flags: list[str]) -> tuple[list[str], int]:
    """flower-supernode's flags with `--isolation process` added, and its Runtime API port."""
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT

    def value(name: str) -> str | None:
        for i, flag in enumerate(flags):
            if flag.startswith(f"{name}="):
                return flag.split("=", 1)[1]
            if flag == name and i + 1 < len(flags):
                return flags[i + 1]
        return None

    if value("--isolation") not in (None, "process"):
        raise NodeError(f"--executor runs the SuperNode with --isolation process, but its flags say "
                        f"--isolation {value('--isolation')}; leave --isolation out")
    if value("--ssl-certfile") or value("--host") not in (None, "127.0.0.1", "localhost"):
        raise NodeError("--executor reaches the SuperNode's Runtime API on 127.0.0.1 without TLS; "
                        "leave out --host and the Runtime API's --ssl-* flags")
    port = value("--port") or str(SUPERNODE_UVICORN_DEFAULT_PORT)
    if not port.isdigit():
        raise NodeError(f"--port {port}: not a port number")
    return flags + (["--isolation", "process"] if value("--isolation") is None else []), int(port)


def start_executor(port: int, *, log: Path) -> Companion:
    """The node's ClientApp executor (`fedcl.client.executor`); it waits for the SuperNode itself.

    It holds no model and no ledger (the worker does), so one that dies is simply started
    again: the message it had claimed is failed by the SuperNode once its heartbeat stops
    (Flower's rule, an error reply to the server), and the new one serves the next."""
    from fedcl.ops.deploy.launch import executor_command, flwr_env

    def begin() -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, *executor_command(port)[1:]], stdout=out,
                                    stderr=subprocess.STDOUT, env=flwr_env(), start_new_session=True)
        print(f"fedcl deploy node: node executor {proc.pid} for 127.0.0.1:{port} (log: {log})", flush=True)
        return proc

    return Companion("node executor", begin(), log, restart=begin)


def _supernode_command(flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedcl.ops.deploy.supernode", *flags]


def run_supernode(flags: list[str], companions: list[Companion]) -> int:
    """flower-supernode (HTTP 500s retried) until it exits; signals go to every process."""
    from fedcl.ops.deploy.launch import flwr_env

    node = subprocess.Popen(_supernode_command(flags), env=flwr_env(), start_new_session=True)
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        for proc in (node, *(c.proc for c in companions)):
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    lost = None
    try:
        while node.poll() is None and lost is None:
            for c in companions:
                if c.proc.poll() is None or stopping:
                    continue
                now = time.monotonic()
                if not c.may_restart(now):
                    lost = c
                    break
                c.restarts.append(now)
                print(f"fedcl deploy node: {c.name} {c.proc.pid} exited ({c.proc.returncode}); starting it "
                      f"again ({len(c.restarts)} of {RESTARTS} in {RESTART_WINDOW:.0f} s; see {c.log})",
                      file=sys.stderr, flush=True)
                stop(c.proc)  # whatever it left in its process group
                c.proc = c.restart()
            time.sleep(0.5)
        if lost is not None:
            again = f", after {len(lost.restarts)} restarts in {RESTART_WINDOW:.0f} s" if lost.restart else ""
            print(f"fedcl deploy node: {lost.name} exited ({lost.proc.returncode}){again}; stopping the "
                  f"SuperNode (see {lost.log})", file=sys.stderr, flush=True)
            stop(node)
    finally:
        for companion in companions:
            stop(companion.proc)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    code = node.returncode
    code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    return code or (1 if lost is not None else 0)


def run_node(supernode_flags: list[str], *, worker_log: Path | None = None,
             worker_timeout: float = 60.0, executor: bool = False, executor_log: Path | None = None) -> int:
    """`fedcl deploy node`: the worker (and with `executor` the executor), then the SuperNode."""
    flags, state_dir = node_flags(supernode_flags)
    if executor:
        flags, port = executor_flags(flags)  # bad flags refused before anything starts
    companions = [start_worker(state_dir, log=worker_log or state_dir / "worker.log", timeout=worker_timeout)]
    if executor:
        companions.append(start_executor(port, log=executor_log or state_dir / "executor.log"))
    return run_supernode(flags, companions)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still there after STOP_WAIT s; then whatever it left
    in its process group (a killed worker supervisor's serving process, say)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session: its group's id
    except (ProcessLookupError, PermissionError):
        pass


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except (FileNotFoundError, NotADirectoryError):  # none yet (the worker reports a bad folder)
        return None
    return st.st_ino, st.st_ctime_ns


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
