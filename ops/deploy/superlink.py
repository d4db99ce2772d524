"""`flower-superlink`, with its SQLite state waiting longer for a lock before it gives up.

    python -m fedcl.ops.deploy.superlink --database FILE ...   # flower-superlink's own flags

Measured with Flower 1.42 (bench/deployment.py, 12 SuperNodes at load 15-20 on 2 cores):
the SuperLink's SQLite state (WAL journal) sets `busy_timeout` to 5 s. Every Fleet,
ServerApp and SuperExec request is a short transaction, but with a dozen nodes pulling,
pushing and sending heartbeats at once on a starved CPU, a writer can wait longer than
that for the one write lock. The request then fails with "database is locked" (HTTP 500
to a node; an error that ended the SuperExec), a reply may never be delivered, and once
the run's own heartbeats failed the SuperLink marked the run finished mid-round.

Waiting is the right answer to a lock: every transaction holding it is short and will
commit, so the wait ends when the CPU gets to it. `BUSY_TIMEOUT_S` (20 s, settable with
`FEDCL_SUPERLINK_BUSY_TIMEOUT_S`) is four times Flower's and under one heartbeat interval
(a node sends one about every 24 s and is marked offline after 60 s without), so a node
whose request waited is not taken for gone.
The persistent SQLite file is kept (a SuperLink restarted after a crash resumes from it);
Flower's in-memory state would not lock, but would lose every run on a restart.

Two more changes make a Fleet request cheaper (`bench/deployment.py --trace`; BENCHMARKS
"The SuperLink's SQLite state, one request at a time"): the process's transactions queue
on one lock instead of polling SQLite's (`serialise_transactions`), and the sweep of
expired task claims runs at most once a second, not before every run-status read
(`throttle_token_cleanup`). With 12 SuperNodes the two took a steady round from 7.98 s to
6.69 s (two interleaved runs each; the throttle alone: 7.73 s). `FEDCL_SUPERLINK_SERIAL=0` and
`FEDCL_SUPERLINK_THROTTLE=0` leave Flower's behaviour as it is, for comparison.
"""

from __future__ import annotations

import os
import sys

from fedcl.ops.deploy.env_seconds import env_seconds

BUSY_TIMEOUT_S = 20.0
ENV = "FEDCL_SUPERLINK_BUSY_TIMEOUT_S"
SERIAL_ENV = "FEDCL_SUPERLINK_SERIAL"  # "0": leave Flower's concurrent transactions as they are
THROTTLE_ENV = "FEDCL_SUPERLINK_THROTTLE"  # "0": sweep expired claims before every status read


def busy_timeout_s() -> float:
    """The lock wait to use: `FEDCL_SUPERLINK_BUSY_TIMEOUT_S` when set, else `BUSY_TIMEOUT_S`."""
    return env_seconds(ENV, BUSY_TIMEOUT_S, hint=f"{ENV}=20", valid=lambda v: v > 0, bounds="more than 0 seconds")


def install(timeout_s: float | None = None) -> float:
    """Make every SQLite connection Flower's state opens in this process wait `timeout_s`
    for a lock (before any is opened). Returns the timeout in seconds."""
    import flwr.supercore.sql_mixin as sql_mixin

    seconds = busy_timeout_s() if timeout_s is None else timeout_s
    millis = str(int(round(seconds * 1000)))
    pragmas = tuple((name, millis if name == "busy_timeout" else value)
                    for name, value in sql_mixin.SQLITE_PRAGMAS)
    if "busy_timeout" not in dict(pragmas):
        pragmas = (("busy_timeout", millis), *pragmas)
    sql_mixin.SQLITE_PRAGMAS = pragmas
    return seconds


def serialise_transactions() -> None:
    """One SQLite transaction at a time in this process, queued on a lock.

    The SuperLink serves each request on a thread of its pool, and each opens its own
    connection. Two writers then meet at SQLite's file lock, and the one that loses
    polls for it in sleeps of 1 ms growing to 100 ms. Queued on a lock here, a waiting
    request runs the moment the one before it commits. With 3 nodes, this and the
    sweep below took a Fleet object pull from 63-97 ms (median, at the SuperLink) to
    47-75 ms."""
    import threading

    import flwr.supercore.sql_mixin as sql_mixin

    if getattr(sql_mixin.SqlMixin.session, "fedcl_serialised", False):
        return
    plain = sql_mixin.SqlMixin.session.__wrapped__  # the generator under @contextmanager
    gate = threading.RLock()  # re-entrant: Flower nests sessions of one scope
    from contextlib import contextmanager

    @contextmanager
    def session(self):
        with gate:
            yield from plain(self)

    session.fedcl_serialised = True
    sql_mixin.SqlMixin.session = session


CLEANUP_EVERY_S = 1.0


def throttle_token_cleanup(every_s: float = CLEANUP_EVERY_S) -> None:
    """Sweep expired task claims at most once every `every_s` seconds.

    Flower's SQL state runs this sweep (two UPDATEs, so SQLite's write lock) before
    every run-status read, and a Fleet object pull or push reads the run's status
    first: with three nodes it was a quarter of a pull's time, each one waiting for the
    write lock. A claim expires after many seconds without a heartbeat, so finding it
    a second later changes nothing a node or the ServerApp can see."""
    import threading
    import time

    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    sweep = SqlCoreState._cleanup_expired_task_tokens
    if getattr(sweep, "fedcl_throttled", False):
        return
    last: dict[int, float] = {}
    guard = threading.Lock()

    def throttled(self) -> None:
        now = time.monotonic()
        with guard:
            if now - last.get(id(self), -every_s) < every_s:
                return
            last[id(self)] = now
        sweep(self)

    throttled.fedcl_throttled = True
    SqlCoreState._cleanup_expired_task_tokens = throttled


def main() -> None:
    seconds = install()
    if os.environ.get(SERIAL_ENV, "1") != "0":
        serialise_transactions()
    if os.environ.get(THROTTLE_ENV, "1") != "0":
        throttle_token_cleanup()
    print(f"fedcl: SuperLink state waits up to {seconds:g} s for a database lock", flush=True)
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
