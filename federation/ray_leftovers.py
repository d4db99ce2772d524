"""Ray processes a killed fedcl run left behind: marked when Ray starts, ended at the next start.

Flower's Ray backend shuts Ray down when a run ends; a driver killed with
SIGKILL cannot. Measured with ray 2.55.1: after a ``kill -9`` of ``fedcl
simulate``, Ray's dashboard agent and runtime-env agent outlive it, reparented
to init, and the runtime-env agent ignores SIGTERM. Ray rewrites their command
lines (``ray::DashboardAgent``), so they cannot be told apart by name; they do
inherit the driver's ``RAY_*`` environment variables (the raylet starts its
agents with those only: a mark without the prefix did not reach them).

So `owned_ray()`, around every fedcl use of Ray, puts ``RAY_FEDCL_OWNER=<pid>:<start
time>`` into this process's environment before Ray starts (every process Ray
starts from here inherits it) and writes a marker file naming that owner in
`marker_dir()`; the marker goes when the block ends. `reap_leftovers()`, at
the next start, takes each marker whose driver is gone (no process with that
pid and start time) and ends the processes whose environment names that owner:
SIGTERM, then SIGKILL for those still there after a grace period. A process of
a driver still running, and every process without a fedcl owner mark (anyone
else's Ray), is never touched. Linux only (it reads /proc); elsewhere it does
nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fedcl import atomic

OWNER_VAR = "RAY_FEDCL_OWNER"  # RAY_: the raylet passes only these on to its agents
PROC = Path("/proc")
logger = logging.getLogger("fedcl.engine")


def marker_dir() -> Path:
    """Where the markers of this user's fedcl drivers live."""
    return Path(tempfile.gettempdir()) / f"fedcl-ray-{os.getuid()}"


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), None if there is no such process."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name, in parentheses, may hold spaces: fields count from after its ')'.
    return int(stat.rpartition(")")[2].split()[19])


def owner_token(pid: int | None = None) -> str:
    """The owner mark of process `pid` (default: this one): its pid and start time."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{process_start(pid)}"


def is_alive(token: str) -> bool:
    """Whether the driver a mark names still runs (the same pid and start time: not a reused pid)."""
    pid, _, start = token.partition(":")
    return pid.isdigit() and str(process_start(int(pid))) == start


def owner_of(pid: int) -> str | None:
    """The owner mark in process `pid`'s environment (None: none, or not readable: not ours)."""
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    prefix = f"{OWNER_VAR}=".encode()
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def marked_processes(token: str) -> list[int]:
    """The running processes whose environment carries `token`, this one excepted."""
    if not PROC.is_dir():
        return []
    own = os.getpid()
    return sorted(int(p.name) for p in PROC.iterdir()
                  if p.name.isdigit() and int(p.name) != own and owner_of(int(p.name)) == token)


def _end(pids: list[int], token: str, grace: float) -> None:
    """SIGTERM, then SIGKILL what is left after `grace` seconds (still carrying `token`)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(owner_of(p) == token for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if owner_of(pid) == token:  # the same process: a zombie or a reused pid carries no mark
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def reap_leftovers(directory: Path | None = None, *, grace: float = 2.0) -> list[int]:
    """End the processes of fedcl drivers that are gone; return their pids (see the module docstring)."""
    directory = marker_dir() if directory is None else directory
    ended: list[int] = []
    for marker in sorted(directory.glob("owner-*")) if directory.is_dir() else []:
        try:
            token = marker.read_text().strip()
        except FileNotFoundError:  # its driver just ended and removed it
            continue
        if is_alive(token):
            continue
        pids = marked_processes(token)
        if pids:
            logger.warning("ending %d process(es) left by fedcl run %s, which was killed: %s",
                           len(pids), token, pids)
            _end(pids, token, grace)
            ended += pids
        marker.unlink(missing_ok=True)
    return ended


@contextlib.contextmanager
def owned_ray(directory: Path | None = None) -> Iterator[str]:
    """Mark what Ray starts from this process (the environment) and record the mark (a marker
    file) for the length of the block; nested blocks share the outer one's marker."""
    directory = marker_dir() if directory is None else directory
    token = owner_token()
    before = os.environ.get(OWNER_VAR)
    os.environ[OWNER_VAR] = token
    marker = directory / f"owner-{token.replace(':', '-')}"
    created = not marker.exists()
    if created:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic.write_text(marker, token + "\n")
    try:
        yield token
    finally:
        if created:
            marker.unlink(missing_ok=True)
        # What this process starts after the block is not Ray's, and no marker names it.
        if before is None:
            os.environ.pop(OWNER_VAR, None)
        else:
            os.environ[OWNER_VAR] = before
