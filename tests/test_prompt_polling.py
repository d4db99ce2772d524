"""Flower's fixed waits on a deployed message's path, shortened: the ServerApp's grid asks
for replies at most 0.25 s apart (not 3 s), the SuperNode pulls every 1 s when idle (not
3 s) and from 0.1 s right after a reply, and looks for its ClientApp's reply every 0.05 s
(not 0.5 s).

The end-to-end effect is measured in bench/deployment.py; the deployed tests
(tests/test_deployment.py, tests/test_executor.py) run every round through both.
"""

from __future__ import annotations

import inspect

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedcl.federation.grid import set_task_identity
from fedcl.federation.reply_polling import REPLY_POLL_S, PollingGrid, polling

pytestmark = pytest.mark.deployment


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()  # a Message needs one, as inside a ServerApp


class ScriptedGrid(Grid):
    """A grid whose reply to each pushed message arrives at a given pull (or never)."""

    def __init__(self, arrives_at: list[int | None]):
        self.arrives_at, self.pulls, self.asked = arrives_at, 0, []
        self.messages: dict[str, Message] = {}

    def set_run(self, run): ...

    @property
    def run(self): ...

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self):
        return [1, 2, 3]

    def push_messages(self, messages):
        ids = []
        for i, message in enumerate(messages):
            ids.append(f"m{i}")
            self.messages[f"m{i}"] = message
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        self.asked.append(sorted(message_ids))
        replies = []
        for i, message_id in enumerate(sorted(message_ids)):
            at = self.arrives_at[int(message_id[1:])]
            if at is not None and self.pulls >= at:
                reply = Message(RecordDict(), reply_to=self.messages[message_id])
                reply.metadata.__dict__["_reply_to_message_id"] = message_id
                replies.append(reply)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("PollingGrid must not fall back to the wrapped grid's loop")


def messages(n: int) -> list[Message]:
    return [Message(content=RecordDict(), dst_node_id=i + 1, message_type="train") for i in range(n)]


def test_polling_grid_collects_every_reply_and_stops_asking_for_those_it_has():
    grid = ScriptedGrid([1, 3, 2])
    replies = PollingGrid(grid, interval=0.01).send_and_receive(messages(3), timeout=30)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 3
    assert grid.asked == [["m0", "m1", "m2"], ["m1", "m2"], ["m1"]]  # each reply pulled once


def test_polling_grid_returns_what_came_when_the_round_times_out():
    grid = ScriptedGrid([1, None])
    replies = PollingGrid(grid, interval=0.01).send_and_receive(messages(2), timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert grid.pulls >= 2 and grid.asked[-1] == ["m1"]


def test_polling_grid_delegates_the_rest_and_rejects_a_bad_interval():
    grid = ScriptedGrid([])
    wrapped = PollingGrid(grid)
    assert wrapped.interval == REPLY_POLL_S < 3
    assert list(wrapped.get_node_ids()) == [1, 2, 3]
    assert wrapped.create_message(RecordDict(), "train", 2, "1").metadata.dst_node_id == 2
    with pytest.raises(ValueError, match="interval 0"):
        PollingGrid(grid, interval=0)


def test_only_a_deployments_grid_is_wrapped():
    from flwr.superlink.grid import HttpGrid

    from fedcl.federation.grid import InProcessGrid

    deployed = HttpGrid("127.0.0.1:9091", insecure=True, token="t")
    assert isinstance(polling(deployed), PollingGrid) and polling(deployed).grid is deployed
    in_process = InProcessGrid(lambda message, context: message, 1, {})
    assert polling(in_process) is in_process


def test_supernode_message_loop_waits_are_shortened():
    """The two fixed sleeps fedcl maps are still Flower's (a Flower upgrade that changed
    them fails here, not silently in a deployment), and the loop sees the short ones."""
    import flwr.supernode.start_client_internal as message_loop

    from fedcl.ops.deploy import supernode

    source = inspect.getsource(message_loop)
    assert source.count(f"time.sleep({supernode.FLOWER_IDLE_SLEEP_S})") == 1
    assert source.count(f"time.sleep({supernode.FLOWER_REPLY_SLEEP_S})") == 2
    slept = []
    clock = supernode.PromptClock(idle=0.7, reply=0.02)
    import time

    real, time.sleep = time.sleep, slept.append
    try:
        clock.sleep(3), clock.sleep(0.5), clock.sleep(0.2)
    finally:
        time.sleep = real
    assert slept == [0.7, 0.02, 0.2]
    assert clock.monotonic() > 0  # the rest is the real module
    supernode.install(idle=1.0)
    assert isinstance(message_loop.time, supernode.PromptClock) and message_loop.time.idle == 1.0


def test_polls_start_short_after_a_message_and_grow_to_their_interval(monkeypatch):
    """The ServerApp asks again 0.05 s after a reply came in, then half as long again each
    time up to its interval; the SuperNode's idle pull does the same from 0.1 s once it
    has sent a reply, and waits its full interval before any message."""
    import types

    from fedcl.federation import reply_polling
    from fedcl.ops.deploy import supernode

    slept = []
    monkeypatch.setattr(reply_polling.time, "sleep", slept.append)
    grid = ScriptedGrid([1, 6])
    PollingGrid(grid, interval=0.1).send_and_receive(messages(2), timeout=30)
    assert slept == pytest.approx([0.05, 0.075, 0.1, 0.1, 0.1])

    clock = supernode.PromptClock(idle=1.0)
    waits = []
    monkeypatch.setattr(supernode.time, "sleep", waits.append)
    clock.sleep(3)
    loop = types.SimpleNamespace(_push_messages=lambda **kw: (_ for _ in ()).throw(ConnectionError("lost")))
    supernode.wake_after_push(loop, clock)
    with pytest.raises(ConnectionError):  # a failed push wakes it too: a message was in hand
        loop._push_messages(state=None)
    for _ in range(8):
        clock.sleep(3)
    assert waits == pytest.approx([1.0, 0.1, 0.15, 0.225, 0.3375, 0.50625, 0.759375, 1.0, 1.0])
    supernode.wake_after_push(loop, clock)  # idempotent: wrapped once
    assert loop._push_messages.fedcl_clock is clock

    with pytest.raises(ValueError, match="growth"):
        reply_polling.Backoff(1.0, growth=0.5)


@pytest.mark.parametrize("raw, error", [("fast", "not a number"), ("0.01", "between 0.1 and 60")])
def test_supernode_idle_pull_setting_is_checked(monkeypatch, raw, error):
    from fedcl.ops.deploy import supernode

    monkeypatch.setenv(supernode.PULL_ENV, raw)
    with pytest.raises(SystemExit, match=error) as raised:
        supernode.idle_pull_s()
    assert f"{supernode.PULL_ENV}=1" in str(raised.value)  # the hint
    monkeypatch.setenv(supernode.PULL_ENV, "2.5")
    assert supernode.idle_pull_s() == 2.5
    monkeypatch.delenv(supernode.PULL_ENV)
    assert supernode.idle_pull_s() == supernode.IDLE_PULL_S


def test_object_pulls_retry_an_unavailable_object_soon_and_are_patched_once():
    """Flower lists a message before its objects have arrived; its pull then waits 1 s
    (doubling) before asking again. fedcl's processes start at 0.05 s."""
    import types

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    from fedcl.federation import reply_polling

    module = types.SimpleNamespace(pull_objects=inflatable_utils.pull_objects)
    reply_polling.prompt_object_pulls(module, "pull_objects")
    reply_polling.prompt_object_pulls(module, "pull_objects")  # not wrapped twice
    assert module.pull_objects.func is inflatable_utils.pull_objects
    assert module.pull_objects.keywords == {"initial_backoff": reply_polling.OBJECT_RETRY_S,
                                            "backoff_cap": reply_polling.LOCAL_RETRY_CAP_S}
    asks = []

    def pull(object_id: str) -> bytes:
        asks.append(object_id)
        if asks.count(object_id) < 3:
            raise ObjectUnavailableError(object_id)
        return object_id.encode()

    assert module.pull_objects(["a", "b"], pull) == {"a": b"a", "b": b"b"}
    assert sorted(asks) == ["a"] * 3 + ["b"] * 3


@pytest.mark.parametrize("argv, expected", [
    (["--superlink", "x:1", "--node-config", 'state-dir="/s/a" partition-id=0'], "/s/a"),
    (["--node-config=partition-id=1 state-dir=\"/s/b\"", "--insecure"], "/s/b"),
    (["--node-config", "partition-id=0"], None),
    (["--node-config", "node.toml"], None),
    (["--superlink", "x:1"], None),
])
def test_supernode_finds_its_state_folder_in_its_flags(argv, expected):
    from fedcl.ops.deploy import supernode

    found = supernode.state_dir_of(argv)
    assert (str(found) if found else None) == expected
