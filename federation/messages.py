"""The message format: how adapter states travel as Flower records, and what they weigh.

The client and the server apps and the strategies all encode and decode
through this module, and name what they put in a message with the keys of
`fedcl.keys`. Flower 1.42 sends a message's content as a tree of deflated
objects (the RecordDict, each record, each array); the sum of those serialised
objects is what a message carries, and is what ``bytes_up``/``bytes_down``
report. `encode_arrays`/`decode_arrays` are the exact JSON form of arrays that
strategy state files use.
"""

from __future__ import annotations

import base64
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from fedcl import keys


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


# -- transport: what a message carries for each `strategy.transport` ---------
# Down, the global state travels as weights (float16 unless float32 is asked
# for: int8 would round absolute weights too coarsely). Up, float16 and int8
# carry the client's update w - w_start, so rounding scales with the small
# update rather than with the weights; float32 carries the weights, exactly.
SCALE_SUFFIX = "::int8-scale"
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


def encode_global(state: dict[str, torch.Tensor], transport: str) -> ArrayRecord:
    dtype = torch.float32 if transport == "float32" else torch.float16
    return ArrayRecord(OrderedDict(
        (name, Array(t.detach().to(dtype).cpu().numpy())) for name, t in state.items()))


def quantize_int8(update: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric per-tensor quantisation: q = round(x / s), s = max|x| / 127."""
    peak = float(update.abs().max()) if update.numel() else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    return torch.clamp(torch.round(update / scale), -127, 127).to(torch.int8), scale


def encode_reply(state: dict[str, torch.Tensor], start: dict[str, torch.Tensor], transport: str) -> ArrayRecord:
    """A client's trained `state` for the wire, relative to the `start` it trained from."""
    if transport == "float32":
        return state_to_arrays(state)
    arrays = OrderedDict()
    for name, tensor in state.items():
        update = tensor.detach().float() - start[name].float()
        if transport == "float16":
            arrays[name] = Array(update.to(torch.float16).numpy())
        else:
            q, scale = quantize_int8(update)
            arrays[name] = Array(q.numpy())
            arrays[name + SCALE_SUFFIX] = Array(np.array([scale], dtype=np.float32))
    return ArrayRecord(arrays)


def decode_update(record: ArrayRecord, start: dict[str, torch.Tensor],
                  transport: str) -> "OrderedDict[str, torch.Tensor]":
    """The float32 update w - start a reply carries (the caller has checked its schema)."""
    update = OrderedDict()
    for name in start:
        values = torch.from_numpy(np.array(record[name].numpy(), dtype=np.float32, copy=True))
        if transport == "float32":
            values = values - start[name]
        elif transport == "int8":
            values = values * float(record[name + SCALE_SUFFIX].numpy()[0])
        update[name] = values
    return update


# -- reading a message ------------------------------------------------------------------

def round_config(msg: Message) -> ConfigRecord:
    """The server's per-round ConfigRecord of `msg` (empty when it sent none)."""
    return msg.content.config_records.get(keys.CONFIG, ConfigRecord())


def reply_metrics(msg: Message) -> MetricRecord:
    """A reply's MetricRecord (empty when it has none)."""
    return next(iter(msg.content.metric_records.values()), MetricRecord())


# -- strategy state on disk: arrays as exact JSON ----------------------------------------

def encode_arrays(arrays: dict[str, np.ndarray] | None) -> dict | None:
    """ndarrays -> JSON-safe, exact (base64 of the raw little-endian bytes)."""
    if arrays is None:
        return None
    return {k: {"dtype": np.asarray(v).dtype.str, "shape": list(np.shape(v)),
                "data": base64.b64encode(np.ascontiguousarray(v).tobytes()).decode("ascii")}
            for k, v in arrays.items()}


def decode_arrays(encoded: dict | None) -> dict[str, np.ndarray] | None:
    if encoded is None:
        return None
    return {k: np.frombuffer(base64.b64decode(v["data"]), dtype=np.dtype(v["dtype"])).reshape(v["shape"]).copy()
            for k, v in encoded.items()}
