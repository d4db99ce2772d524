"""`flower-supernode`, with a SuperLink's transient HTTP 500 retried instead of ending the
node, and Flower's fixed waits in its message loop shortened.

    python -m fedcl.ops.deploy.supernode --superlink HOST:PORT ...   # flower-supernode's own flags

Measured with Flower 1.42 (tests/test_deployment.py, 3 nodes at load ~20 on 2 cores):
the SuperLink's SQLite state gives up on a lock after its 5 s busy timeout, answers the
node's `pull-messages` with HTTP 500 ("database is locked", rolled back), and Flower's
SuperNode does not retry a 500: the exception ends its message loop while its heartbeat
thread keeps it "online", so the SuperLink keeps sending it messages that no one pulls,
and every later round waits out its timeout for that node's replies.

Here a 500 on the Fleet calls that can be repeated safely (pulling, sending and
confirming messages and objects, run and FAB lookups, heartbeats) is retried with
Flower's own back-off, each retry logged, at most `MAX_500_RETRIES` times in a row per
thread; past that the node fails as before, loudly. The SuperLink's body is sanitised
("Internal server error"), so a lock cannot be told from other 500s: the bound keeps
a persistent fault from being retried forever.

Its fixed waits are shortened too. Flower's message loop (start_client_internal.py)
sleeps 3 s after a pull that found no message, and waits for the ClientApp's reply in
0.5 s steps; on a steady round whose work takes a fraction of a second those sleeps
are most of the round, twice a round (train, then evaluate). Here the idle pull waits
`IDLE_PULL_S` (1 s; `FEDCL_SUPERNODE_PULL_S`, at least 0.1 s) and the reply wait
`REPLY_WAIT_S`. An idle pull is one authenticated request to the SuperLink: a dozen
nodes at 1 s add a dozen small requests a second to its database, which its 20 s lock
wait (`fedcl.ops.deploy.superlink`) carries; the reply wait reads the node's own
in-memory state and costs nothing outside it. Its pulls of a message's objects retry
an object not yet on the SuperLink after 0.05 s, not Flower's 1 s
(`fedcl.federation.reply_polling.prompt_object_pulls`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from fedcl.ops.deploy.env_seconds import env_seconds

logger = logging.getLogger("fedcl.supernode")

MAX_500_RETRIES = 20
RETRIED_PATHS = ("/v1/fleet/pull-messages", "/v1/fleet/push-messages", "/v1/fleet/confirm-message-received",
                 "/v1/fleet/pull-object", "/v1/fleet/push-object", "/v1/fleet/get-run", "/v1/fleet/get-fab",
                 "/v1/fleet/send-node-heartbeat")


def retrying_500(make_invoker):
    """A factory like Flower's `make_simple_http_retry_invoker` whose invokers also retry
    an HTTP 500 on `RETRIED_PATHS`, up to `MAX_500_RETRIES` in a row (per thread)."""
    import httpx

    def make():
        invoker = make_invoker()
        giveup, succeeded = invoker.should_giveup, invoker.on_success
        streak = threading.local()

        def should_giveup(exc: Exception) -> bool:
            if (isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 500
                    and exc.request.url.path in RETRIED_PATHS):
                streak.n = getattr(streak, "n", 0) + 1
                if streak.n <= MAX_500_RETRIES:
                    print(f"fedcl: SuperLink answered {exc.request.url.path} with HTTP 500 "
                          f"(e.g. its database locked); retry {streak.n} of {MAX_500_RETRIES}", flush=True)
                    return False
                print(f"fedcl: {exc.request.url.path}: HTTP 500 {streak.n - 1} times in a row; giving up",
                      flush=True)
            return giveup(exc) if giveup is not None else False

        def on_success(state) -> None:
            streak.n = 0
            if succeeded is not None:
                succeeded(state)

        invoker.should_giveup, invoker.on_success = should_giveup, on_success
        return invoker

    return make


IDLE_PULL_S = 1.0
REPLY_WAIT_S = 0.05
PULL_ENV = "FEDCL_SUPERNODE_PULL_S"
# Flower 1.42's fixed sleeps in its message loop: after an empty pull, and between looks
# for the ClientApp's reply (and for an object of it).
FLOWER_IDLE_SLEEP_S, FLOWER_REPLY_SLEEP_S = 3, 0.5


def idle_pull_s() -> float:
    """The wait after an empty pull: `FEDCL_SUPERNODE_PULL_S` when set, else `IDLE_PULL_S`."""
    return env_seconds(PULL_ENV, IDLE_PULL_S, hint=f"{PULL_ENV}=1", valid=lambda v: 0.1 <= v <= 60,
                       bounds="between 0.1 and 60 seconds")


class PromptClock:
    """What Flower's message loop sees as its `time` module: every function is the real
    one's, except that its two fixed sleeps take `idle` and `reply` seconds instead."""

    def __init__(self, idle: float, reply: float = REPLY_WAIT_S):
        self.idle, self.reply = idle, reply

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP_S:
            seconds = self.idle
        elif seconds == FLOWER_REPLY_SLEEP_S:
            seconds = self.reply
        time.sleep(seconds)


def install(idle: float | None = None) -> None:
    """Make the SuperNode's Fleet connection retry, and its loop wait, as above (before
    it connects)."""
    import flwr.supernode.fleet_http_connection as connection
    import flwr.supernode.start_client_internal as message_loop

    from fedcl.federation.reply_polling import REMOTE_RETRY_CAP_S, prompt_object_pulls

    message_loop.time = PromptClock(idle_pull_s() if idle is None else idle)
    # The SuperLink lists a message before the server has pushed all its objects.
    prompt_object_pulls(message_loop, "pull_objects", cap=REMOTE_RETRY_CAP_S)

    if not getattr(connection.make_simple_http_retry_invoker, "fedcl_retrying_500", False):
        patched = retrying_500(connection.make_simple_http_retry_invoker)
        patched.fedcl_retrying_500 = True
        connection.make_simple_http_retry_invoker = patched


def main() -> None:
    idle = idle_pull_s()
    install(idle)
    print(f"fedcl: SuperNode pulls every {idle:g} s while idle, looks for replies every {REPLY_WAIT_S:g} s",
          flush=True)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
