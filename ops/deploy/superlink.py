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
"""

from __future__ import annotations

import sys

from fedcl.ops.deploy.env_seconds import env_seconds

BUSY_TIMEOUT_S = 20.0
ENV = "FEDCL_SUPERLINK_BUSY_TIMEOUT_S"


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


def main() -> None:
    seconds = install()
    print(f"fedcl: SuperLink state waits up to {seconds:g} s for a database lock", flush=True)
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
