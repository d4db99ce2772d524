"""`flower-supernode`, with a SuperLink's transient HTTP 500 retried instead of ending the node.

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
"""

from __future__ import annotations

import logging
import sys
import threading

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


def install() -> None:
    """Make the SuperNode's Fleet connection retry as above (before it connects)."""
    import flwr.supernode.fleet_http_connection as connection

    if not getattr(connection.make_simple_http_retry_invoker, "fedcl_retrying_500", False):
        patched = retrying_500(connection.make_simple_http_retry_invoker)
        patched.fedcl_retrying_500 = True
        connection.make_simple_http_retry_invoker = patched


def main() -> None:
    install()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
