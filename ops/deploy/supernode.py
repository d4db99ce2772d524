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
`REPLY_WAIT_S`. Right after the node sent a reply the idle pull waits only
`EAGER_PULL_S`, then half as long again each time, up to `IDLE_PULL_S` (about six
pulls in the two seconds after a reply, where the round's next message usually comes).
An idle pull is one authenticated request to the SuperLink: a dozen
nodes at 1 s add a dozen small requests a second to its database, which its 20 s lock
wait (`fedcl.ops.deploy.superlink`) carries; the reply wait reads the node's own
in-memory state and costs nothing outside it. Its pulls of a message's objects retry
an object not yet on the SuperLink after 0.05 s, not Flower's 1 s
(`fedcl.federation.reply_polling.prompt_object_pulls`).

A node that was killed rejoins at once. The SuperLink keeps a killed node "online" until
its heartbeats have been missing for two intervals (60 s in Flower 1.42) and refuses to
activate it again before that (HTTP 412, "Failed to activate SuperNode"): measured in
the container run (docker/e2e.py), a restarted institution was refused for 54 s while
the run's next round went on without it. Here the node writes the id the SuperLink gave
it to its state folder (`NODE_ID_FILE`, from the node config's `state-dir`); refused
activation with that file present, it deactivates that id (the request is signed with
the node's key, and the SuperLink accepts it only for the id that key holds) and
activates again `REJOIN_GAP_S` later. While it is offline the SuperLink answers the
message the dead process had taken with an error reply (Flower's rule for a message
whose node is offline), so the server's round goes on with the other replies instead
of waiting out its timeout; activated at once, the node would be online again before
the server asked, and that message would hold the round until its timeout (measured:
the container run's round 1 waited out its 420 s). Two live processes with one key would take the node from each
other: `fedcl deploy node` refuses a second node on the same state folder (its worker's
socket), and an institution's key belongs to one node.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

from fedcl import atomic, keys
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
EAGER_PULL_S = 0.1  # the first wait after a reply was sent, growing by half to IDLE_PULL_S
REPLY_WAIT_S = 0.05
PULL_ENV = "FEDCL_SUPERNODE_PULL_S"
# Flower 1.42's fixed sleeps in its message loop: after an empty pull, and between looks
# for the ClientApp's reply (and for an object of it).
FLOWER_IDLE_SLEEP_S, FLOWER_REPLY_SLEEP_S = 3, 0.5


def idle_pull_s() -> float:
    """The wait after an empty pull: `FEDCL_SUPERNODE_PULL_S` when set, else `IDLE_PULL_S`."""
    return env_seconds(PULL_ENV, IDLE_PULL_S, hint=f"{PULL_ENV}=1", valid=lambda v: 0.1 <= v <= 60,
                       bounds="between 0.1 and 60 seconds")


NODE_ID_FILE = "supernode-id"
# A rejoining node stays offline this long: the SuperLink answers a message whose node is
# offline with an error reply when the server next asks for replies (the ServerApp asks
# at most 0.25 s apart, `reply_polling.REPLY_POLL_S`), so the message the dead process
# had taken fails at once instead of holding the round to its timeout.
REJOIN_GAP_S = 3.0


def state_dir_of(argv: list[str]) -> Path | None:
    """The node config's `state-dir` among flower-supernode's flags (None without one)."""
    from flwr.common.config import parse_config_args

    for i, flag in enumerate(argv):
        text = argv[i + 1] if flag == "--node-config" and i + 1 < len(argv) else (
            flag.split("=", 1)[1] if flag.startswith("--node-config=") else None)
        if text is not None and not text.strip().endswith(".toml"):
            try:
                found = parse_config_args([text]).get(keys.NODE_STATE_DIR)
            except ValueError:
                return None  # flower-supernode reports its own bad flags
            return Path(found) if isinstance(found, str) and found else None
    return None


def rejoining(client_cls, id_file: Path) -> None:
    """Make `client_cls.ActivateNode` (Flower's Fleet HTTP client) record the node's id in
    `id_file`, and, refused because the SuperLink still holds that id online, deactivate
    it and activate again (once). Idempotent."""
    import httpx
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.error import ApiErrorCode, FlowerError

    activate = client_cls.ActivateNode
    if getattr(activate, "fedcl_rejoining", False):
        return

    def held_online(exc: Exception) -> int | None:
        if not (isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 412):
            return None
        error = FlowerError.from_json(exc.response.text)
        if error is None or error.code != ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED:
            return None
        try:
            return int(id_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def ActivateNode(self, request):  # noqa: N802 (Flower's name)
        try:
            response = activate(self, request)
        except Exception as exc:
            node_id = held_online(exc)
            if node_id is None:
                raise
            print(f"fedcl: the SuperLink still holds node {node_id} online from before this node's restart "
                  f"({id_file}); deactivating it, then activating again", flush=True)
            self.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
            time.sleep(REJOIN_GAP_S)  # offline while the server asks: the lost message fails now
            response = activate(self, request)
        try:
            atomic.write_text(id_file, f"{response.node_id}\n", mode=0o600)
        except OSError as exc:  # the node runs; only a quick rejoin after a crash is lost
            print(f"fedcl: could not record the node's id in {id_file} ({exc}); after a crash it "
                  "rejoins only once the SuperLink has marked it offline", flush=True)
        return response

    ActivateNode.fedcl_rejoining = True
    client_cls.ActivateNode = ActivateNode


class PromptClock:
    """What Flower's message loop sees as its `time` module: every function is the real
    one's, except its two fixed sleeps. The reply look takes `reply` seconds; the wait
    after an empty pull starts short once a reply has been sent (`awake`) and grows to
    `idle` (`reply_polling.Backoff`): the next message of a round (evaluate after train,
    the next round's train) usually comes within a second, and a node with no run soon
    pulls every `idle` seconds again."""

    def __init__(self, idle: float, reply: float = REPLY_WAIT_S):
        from fedcl.federation.reply_polling import Backoff

        self.idle, self.reply = idle, reply
        self.waits = Backoff(idle, first=EAGER_PULL_S, rested=True)  # no message yet: the long interval

    def __getattr__(self, name):
        return getattr(time, name)

    def awake(self) -> None:
        self.waits.reset()

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP_S:
            seconds = self.waits.next()
        elif seconds == FLOWER_REPLY_SLEEP_S:
            seconds = self.reply
        time.sleep(seconds)


def wake_after_push(message_loop, clock: PromptClock) -> None:
    """Make the loop's `_push_messages` (it sends the ClientApp's reply) wake `clock`. Idempotent."""
    push = message_loop._push_messages
    if getattr(push, "fedcl_wakes", False):
        push.fedcl_clock = clock
        return

    def pushed(*args, **kwargs):
        try:
            return push(*args, **kwargs)
        finally:
            pushed.fedcl_clock.awake()

    pushed.fedcl_wakes, pushed.fedcl_clock = True, clock
    message_loop._push_messages = pushed


def install(idle: float | None = None, state_dir: Path | None = None) -> None:
    """Make the SuperNode's Fleet connection retry, its loop wait and (with the node's
    `state_dir`) a restarted node rejoin, as above (before it connects)."""
    import flwr.supernode.fleet_http_connection as connection
    import flwr.supernode.start_client_internal as message_loop
    from flwr.supernode.fleet_http_client import FleetHttpClient

    from fedcl.federation.reply_polling import REMOTE_RETRY_CAP_S, prompt_object_pulls

    message_loop.time = PromptClock(idle_pull_s() if idle is None else idle)
    wake_after_push(message_loop, message_loop.time)
    # The SuperLink lists a message before the server has pushed all its objects.
    prompt_object_pulls(message_loop, "pull_objects", cap=REMOTE_RETRY_CAP_S)

    if not getattr(connection.make_simple_http_retry_invoker, "fedcl_retrying_500", False):
        patched = retrying_500(connection.make_simple_http_retry_invoker)
        patched.fedcl_retrying_500 = True
        connection.make_simple_http_retry_invoker = patched
    if state_dir is not None:
        rejoining(FleetHttpClient, state_dir / NODE_ID_FILE)


def main() -> None:
    idle = idle_pull_s()
    install(idle, state_dir_of(sys.argv[1:]))
    print(f"fedcl: SuperNode pulls every {idle:g} s while idle (from {min(EAGER_PULL_S, idle):g} s after a reply), "
          f"looks for replies every {REPLY_WAIT_S:g} s",
          flush=True)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
