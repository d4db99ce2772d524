"""What travels: adapter states as Flower records, and their size on the wire.

Flower 1.42 sends a message's content as a tree of deflated objects (the
RecordDict, each record, each array); the sum of those serialised objects is
what a message carries, and is what `bytes_up`/`bytes_down` report.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def message_bytes(content) -> int:
    """Bytes of the serialised object tree Flower transmits for `content`."""
    total, stack, seen = 0, [content], set()
    while stack:
        obj = stack.pop()
        oid = id(obj)
        if oid in seen:
            continue
        seen.add(oid)
        total += len(obj.deflate())
        stack.extend(obj.children.values() if obj.children else ())
    return total


def state_to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """Adapter state -> ArrayRecord (float32; Flower rejects bfloat16)."""
    return ArrayRecord(OrderedDict(
        (name, Array(t.detach().to(torch.float32).cpu().numpy())) for name, t in state.items()))


def arrays_to_state(record: ArrayRecord) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict(
        (name, torch.from_numpy(np.array(arr.numpy(), dtype=np.float32, copy=True)))
        for name, arr in record.items())
