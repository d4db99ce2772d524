"""Each ArrayRecord of a deployed message travels as one array, not one object per tensor.

Flower 1.42 sends a message as a tree of objects, one request each: the message, its
RecordDict, every record, and every array with its chunk. An adapter of 16 tensors
made a message of 36 objects, and with TLS and node authentication each object is a
round trip to the SuperLink: measured on 3 SuperNodes (bench/deployment.py), a node
took 0.5-1.7 s to pull one such message, and its executor as long again, four times a
round (train and evaluate, down and up). A model with LoRA in more layers has more
tensors and pays more.

`pack` joins the arrays of each ArrayRecord with two or more into one byte array, in
order, and puts their names, dtypes and shapes beside it in a ConfigRecord; `unpack`
gives back the same arrays, byte for byte. Only the transport changes: the ServerApp's
deployed grid packs what it sends and unpacks what it receives
(`fedcl.federation.reply_polling.PollingGrid`), and the ClientApp unpacks a packed
message and packs its reply the same way (`fedcl.client.app`); strategies, handlers
and the simulation engine see the ordinary records. What leaves a node is the same
arrays, in the same precision.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

PACKED = "fedcl.packed"  # the one array of a packed ArrayRecord
INDEX_PREFIX = "fedcl.packed-index:"  # + the ArrayRecord's key: its names, dtypes, shapes


class PackingError(ValueError):
    """A packed record whose index does not describe its bytes."""


def _index_key(name: str) -> str:
    return f"{INDEX_PREFIX}{name}"


def is_packed(content: RecordDict) -> bool:
    return any(key.startswith(INDEX_PREFIX) for key in content.keys())


def pack(content: RecordDict) -> RecordDict:
    """`content` with each ArrayRecord of two or more arrays joined into one."""
    if is_packed(content):
        raise PackingError("the message is packed already")
    packed = RecordDict()
    for key, record in content.items():
        if not isinstance(record, ArrayRecord) or len(record) < 2:
            packed[key] = record
            continue
        names, dtypes, ndims, shapes, parts = [], [], [], [], []
        for name, array in record.items():
            values = np.array(array.numpy(), order="C", copy=False)  # keeps a 0-d array 0-d
            names.append(name)
            dtypes.append(values.dtype.str)
            ndims.append(values.ndim)
            shapes.extend(int(n) for n in values.shape)
            parts.append(values.reshape(-1).view(np.uint8))
        packed[key] = ArrayRecord({PACKED: Array(np.concatenate(parts))})
        index = {"names": names, "dtypes": dtypes, "ndims": ndims}
        if shapes:  # a ConfigRecord holds no empty list: scalars only means no shapes at all
            index["shapes"] = shapes
        packed[_index_key(key)] = ConfigRecord(index)
    return packed


def unpack(content: RecordDict) -> RecordDict:
    """The records `pack` was given (a message that is not packed is returned as it is)."""
    if not is_packed(content):
        return content
    out = RecordDict()
    for key, record in content.items():
        if key.startswith(INDEX_PREFIX):
            continue
        index = content.get(_index_key(key)) if isinstance(record, ArrayRecord) else None
        out[key] = record if index is None else _unpack_record(key, record, index)
    for key in content.keys():
        if key.startswith(INDEX_PREFIX) and key[len(INDEX_PREFIX):] not in content:
            raise PackingError(f"{key}: an index for a record the message does not hold")
    return out


def _unpack_record(key: str, record: ArrayRecord, index: ConfigRecord) -> ArrayRecord:
    try:
        names, dtypes, ndims = list(index["names"]), list(index["dtypes"]), list(index["ndims"])
        shapes = list(index.get("shapes", []))
        data = record[PACKED].numpy()
    except KeyError as missing:
        raise PackingError(f"record {key!r}: packed without {missing}") from None
    if not len(names) == len(dtypes) == len(ndims) or sum(ndims) != len(shapes) or data.dtype != np.uint8:
        raise PackingError(f"record {key!r}: its index does not describe its arrays "
                           f"({len(names)} names, {len(dtypes)} dtypes, {len(ndims)} ranks, {len(shapes)} sizes)")
    arrays, offset, dim = {}, 0, 0
    for name, dtype, ndim in zip(names, dtypes, ndims):
        shape = tuple(shapes[dim:dim + ndim])
        dim += ndim
        kind = np.dtype(dtype)
        size = kind.itemsize * int(np.prod(shape, dtype=np.int64))
        if offset + size > data.size:
            raise PackingError(f"record {key!r}: array {name!r} runs past the packed bytes")
        arrays[name] = Array(data[offset:offset + size].view(kind).reshape(shape).copy())
        offset += size
    if offset != data.size:
        raise PackingError(f"record {key!r}: {data.size - offset} packed bytes left over")
    return ArrayRecord(arrays)
