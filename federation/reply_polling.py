"""Ask the SuperLink for replies often, not every 3 s.

In a deployment the ServerApp's grid is Flower's `HttpGrid`: its `send_and_receive`
pushes a round's messages, then asks the SuperLink for replies and sleeps a fixed 3 s
between asks (Flower 1.42, superlink/grid/http_grid.py). On a steady round whose work
takes a fraction of a second, that sleep alone costs up to 3 s twice a round (train,
then evaluate), where the simulation engine's grid asks every 0.1 s.

`PollingGrid` wraps a grid and does the same push and pull with its own interval
(`REPLY_POLL_S`). Each ask is one local call from the ServerApp to its SuperLink
(a read of the replies stored so far), so asking every quarter second costs the
SuperLink little next to the nodes' own traffic. Everything else is the wrapped grid's.

The same goes for an object that is not there yet. A message travels as a tree of
objects, and Flower lists a message before all of its objects have arrived: the
ServerApp pushes a message, then its objects, to the SuperLink; the SuperNode creates
the ClientApp's task, then pulls the message's objects. A reader that asks too early is told "unavailable" and Flower's object pull
waits 1 s before asking again (then 2 s, 4 s, up to 10 s; `PULL_INITIAL_BACKOFF`).
Measured on 3 SuperNodes: the node executor's pull of a task's input took 1.0-2.9 s,
where the objects arrive within a few hundredths of a second. `prompt_object_pulls`
makes a process's Flower pulls start at `OBJECT_RETRY_S` and double up to a cap
(0.1 s on this machine, 0.5 s over the network): the SuperNode (`fedcl.ops.deploy.supernode`), the node executor
(`fedcl.client.executor`) and, through `polling`, the ServerApp.

Every poll on the path starts short and grows (`Backoff`): a reply, or the next message,
usually follows within a fraction of a second of the last one (evaluate after train,
the next round after evaluate), and a wait that grows by half each time is never more
than about half of what has been waited already, while an idle federation soon polls
at the long interval again and costs no more than a fixed one would.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedcl.federation import packing

REPLY_POLL_S = 0.25  # the longest wait between asks; the first is `FIRST_POLL_S`
FIRST_POLL_S, POLL_GROWTH = 0.05, 1.5
# Retry an unavailable object after 0.05 s, doubling up to the cap: 0.1 s where the
# objects come from this machine (the executor from its SuperNode, the ServerApp from
# its SuperLink), 0.5 s where they cross the network (a SuperNode from the SuperLink).
OBJECT_RETRY_S, LOCAL_RETRY_CAP_S, REMOTE_RETRY_CAP_S = 0.05, 0.1, 0.5


class Backoff:
    """Waits that start at `first` seconds and grow by `growth` up to `cap`; `reset()`
    (after activity) starts them short again. With `rested`, the first wait is the cap
    (nothing has happened yet to expect more soon)."""

    def __init__(self, cap: float, first: float = FIRST_POLL_S, growth: float = POLL_GROWTH, *,
                 rested: bool = False):
        if not (cap > 0 and first > 0 and growth >= 1):
            raise ValueError(f"Backoff: cap {cap!r} and first {first!r} must be more than 0 s, growth {growth!r} "
                             "at least 1")
        self.cap, self.first, self.growth = cap, min(first, cap), growth
        self.wait = cap if rested else self.first

    def reset(self) -> None:
        self.wait = self.first

    def next(self) -> float:
        """The wait to take now; the one after it is longer, up to the cap."""
        wait = self.wait
        self.wait = min(self.wait * self.growth, self.cap)
        return wait


def prompt_object_pulls(module, name: str, cap: float = LOCAL_RETRY_CAP_S) -> None:
    """Make `module.name` (a Flower object-pull function imported there, with
    `initial_backoff` and `backoff_cap` keywords) retry an unavailable object after
    `OBJECT_RETRY_S`, doubling up to `cap` seconds. Idempotent."""
    pull = getattr(module, name)
    if getattr(pull, "fedcl_prompt", False):
        return
    prompt = functools.partial(pull, initial_backoff=OBJECT_RETRY_S, backoff_cap=cap)
    prompt.fedcl_prompt = True
    setattr(module, name, prompt)


class PollingGrid(Grid):
    """`grid`, with `send_and_receive` asking for replies at most `interval` seconds apart
    (from `FIRST_POLL_S`, growing, short again after each reply that comes in), and
    (with `pack`) each message's arrays sent as one (`fedcl.federation.packing`)."""

    def __init__(self, grid: Grid, interval: float = REPLY_POLL_S, pack: bool = True):
        if not interval > 0:
            raise ValueError(f"PollingGrid: interval {interval!r} must be more than 0 seconds")
        self.grid, self.interval, self.pack = grid, interval, pack

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if self.pack:
            for message in messages:
                if message.has_content():
                    message.content = packing.pack(message.content)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:  # a node answers in the form it was sent; an older one, unpacked
            if reply.has_content():
                reply.content = packing.unpack(reply.content)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then collect their replies until all are in or `timeout`
        seconds have passed (None: wait for all), as Flower's grid does."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        waits = Backoff(self.interval)
        while pending:
            pulled = list(self.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(msg.metadata.reply_to_message_id for msg in pulled)
            if not pending:
                break
            if pulled:  # the others' replies tend to follow close behind
                waits.reset()
            wait = waits.next()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(wait, left)
            time.sleep(wait)
        return replies

    def close(self) -> None:
        close = getattr(self.grid, "close", None)
        if close is not None:
            close()


def polling(grid: Grid) -> Grid:
    """`grid` wrapped in `PollingGrid` when it is a deployment's (Flower's `HttpGrid`),
    its object pulls made prompt; the simulation engine's and the in-process grid
    already answer promptly."""
    import flwr.superlink.grid.http_grid as http_grid
    from flwr.superlink.grid import HttpGrid

    if not isinstance(grid, HttpGrid):
        return grid
    prompt_object_pulls(http_grid, "pull_objects")
    return PollingGrid(grid)
