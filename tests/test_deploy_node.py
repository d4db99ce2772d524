"""`fedcl deploy node` (ops/deploy/node.py): the institution image's entrypoint, a node's
worker started next to its SuperNode.

Bad flags are refused before anything starts; the real processes run against a
SuperLink that is not there (the SuperNode keeps retrying its connection), which is
enough to see the worker come up, signals reach both, and a lost worker end the node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcl.ops.cli import main
from fedcl.ops.deploy.launch import free_port
from fedcl.ops.deploy.node import node_flags

pytestmark = pytest.mark.deployment


@pytest.mark.parametrize("flags, message", [
    (["--superlink", "127.0.0.1:9093"], "need exactly one --node-config (found 0)"),
    (["--node-config", 'state-dir="/s"', "--node-config=partition-id=0"], "(found 2)"),
    (["--node-config"], "no value follows it"),
    (["--node-config", "node.toml"], "a TOML file"),
    (["--node-config", "partition-id=0"], 'no state-dir; the worker needs the node\'s state folder'),
    (["--node-config", 'state-dir="{state}" worker="/elsewhere/w.sock"'],
     "names worker='/elsewhere/w.sock', but this command starts the node's worker at {state}/worker.sock"),
])
def test_bad_flags_are_refused_before_anything_starts(tmp_path, capsys, flags, message):
    state = tmp_path / "state"
    flags = [f.replace("{state}", str(state)) for f in flags]
    assert main(["deploy", "node", "--", *flags]) == 2
    assert message.replace("{state}", str(state)) in capsys.readouterr().err
    assert not state.exists()  # no worker was started, no log written


@pytest.mark.parametrize("form", ["split", "joined"])
def test_the_worker_socket_is_added_to_the_node_config(form):
    config = 'data-file="/data/a.jsonl" state-dir="/state" partition-id=0'
    given = ["--node-config", config] if form == "split" else [f"--node-config={config}"]
    flags, state_dir = node_flags(["--superlink=127.0.0.1:9093", *given, "--port=9094"])
    assert state_dir == Path("/state")
    assert flags == ["--superlink=127.0.0.1:9093", f'--node-config={config} worker="/state/worker.sock"',
                     "--port=9094"]
    # naming the very socket this command starts is accepted, and not added twice
    same = f'{config} worker="/state/worker.sock"'
    assert node_flags([f"--node-config={same}"])[0] == [f"--node-config={same}"]


def test_a_worker_that_cannot_start_is_reported_with_its_log(tmp_path, capsys):
    state = tmp_path / "not-a-folder"
    state.write_text("")  # the worker cannot make its socket folder here
    log = tmp_path / "logs" / "worker.log"
    assert main(["deploy", "node", "--worker-log", str(log), "--",
                 "--node-config", f'state-dir="{state}"']) == 2
    err = capsys.readouterr().err
    assert f"node worker for {state}: exited (1); see its log {log}" in err
    assert "FileExistsError" in err or "NotADirectoryError" in err  # the log's tail, in the error


def _start_node(tmp_path: Path, *options: str) -> tuple[subprocess.Popen, Path]:
    state = tmp_path / "state"
    port = free_port()
    node = subprocess.Popen(
        [sys.executable, "-m", "fedcl.ops.cli", "deploy", "node", *options, "--", "--insecure",
         f"--superlink=127.0.0.1:{free_port()}", f"--port={port}",
         f"--node-config=state-dir=\"{state}\" partition-id=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not (state / "worker.sock").exists():
        assert node.poll() is None and time.monotonic() < deadline, node.communicate()[0]
        time.sleep(0.2)
    return node, state


def _worker_pid(state: Path) -> int:
    line = next(line for line in (state / "worker.log").read_text().splitlines() if "serving process" in line)
    return int(line.rsplit(" ", 1)[1])


def _read_until(node: subprocess.Popen, text: str) -> str:
    seen = []
    for line in node.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never came:\n{''.join(seen)}")


def _gone(pid: int, wait: float = 10.0) -> bool:
    """No such process, or only its zombie (killed, not yet reaped by whoever adopted it)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.2)
    return False


def test_sigterm_reaches_the_supernode_and_the_worker(tmp_path):
    node, state = _start_node(tmp_path)
    _read_until(node, "Connection attempt failed")  # the SuperNode runs, retrying its SuperLink
    node.send_signal(signal.SIGTERM)
    out, _ = node.communicate(timeout=60)
    assert node.returncode == 0, out  # the SuperNode's own code: it stopped cleanly on the signal
    assert "SuperExec terminated gracefully" in out
    assert not (state / "worker.sock").exists()  # the worker's supervisor stopped and cleaned up
    assert _gone(_worker_pid(state))  # its serving process too


def test_a_lost_worker_stops_the_supernode(tmp_path):
    node, state = _start_node(tmp_path)
    supervisor = int(_read_until(node, "fedcl deploy node: node worker").rsplit("node worker ", 1)[1].split()[0])
    serving = _worker_pid(state)
    os.kill(supervisor, signal.SIGKILL)
    out, _ = node.communicate(timeout=60)
    assert node.returncode != 0, out  # 1, or 143 when the SuperNode had no signal handler yet
    assert f"node worker exited (-9); stopping the SuperNode (see {state / 'worker.log'})" in out
    assert _gone(serving)  # the dead supervisor's serving process was not left behind


def _executor_pid(node: subprocess.Popen) -> int:
    return int(_read_until(node, "fedcl deploy node: node executor ").rsplit("node executor ", 1)[1].split()[0])


def test_a_dead_executor_is_started_again_while_the_supernode_stays(tmp_path):
    from fedcl.ops.deploy import node as deploy_node

    node, state = _start_node(tmp_path, "--executor")
    first = _executor_pid(node)
    _read_until(node, "Connection attempt failed")  # the SuperNode runs (its signal handler set)
    os.kill(first, signal.SIGKILL)
    said = _read_until(node, "starting it again")
    assert f"node executor {first} exited (-9); starting it again (1 of {deploy_node.RESTARTS}" in said
    second = _executor_pid(node)
    assert second != first and not _gone(second, wait=1.0)
    assert node.poll() is None  # the SuperNode and the worker were not stopped
    node.send_signal(signal.SIGTERM)
    out, _ = node.communicate(timeout=60)
    assert node.returncode == 0, out
    assert _gone(second) and not (state / "worker.sock").exists()


def test_an_executor_that_keeps_dying_stops_the_node(monkeypatch):
    """Past `RESTARTS` deaths in `RESTART_WINDOW` s the node stops instead of looping."""
    from fedcl.ops.deploy import node as deploy_node

    monkeypatch.setattr(deploy_node, "RESTARTS", 2)
    started = []

    def dying() -> subprocess.Popen:
        started.append(subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], start_new_session=True))
        return started[-1]

    supernode_stand_in = [sys.executable, "-c", "import signal, sys, time; "  # stops on SIGTERM, as it does
                          "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); time.sleep(60)"]
    companion = deploy_node.Companion("node executor", dying(), Path("executor.log"), restart=dying)
    monkeypatch.setattr(deploy_node, "_supernode_command", lambda flags: supernode_stand_in)
    code = deploy_node.run_supernode([], [companion])
    assert code == 1 and len(started) == 3  # the first and two restarts, then the node stopped


def test_the_process_table_counts_the_cpu_each_process_used():
    """bench/deployment.py reads a round's CPU by process from these figures."""
    from fedcl.ops.deploy.launch import process_table, process_tree

    spin = ("import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\n"
            "print('done', flush=True)\ntime.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        table = process_table()
        assert child.pid in process_tree(os.getpid(), table)
        assert 0.4 <= table[child.pid]["cpu"] < 30
        assert table[child.pid]["rss"] > 0 and table[child.pid]["cmdline"][0] == sys.executable
    finally:
        child.kill()
        child.wait()
