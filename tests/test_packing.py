"""A deployed message's arrays travel as one array per record (fedcl.federation.packing):
the same arrays come back byte for byte, the message has a fraction of the objects, and
a federation whose messages are packed on the way trains exactly as one whose are not."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedcl.federation import packing
from fedcl.federation.grid import InProcessGrid, server_context, set_task_identity


def arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({
        "layers.0.q.lora_A": Array(rng.standard_normal((8, 16)).astype(np.float32)),
        "layers.0.q.lora_B": Array(rng.standard_normal((16, 8)).astype(np.float16)),
        "scale::int8-scale": Array(np.array(0.25, dtype=np.float32)),  # a scalar: no shape
        "layers.0.v.update": Array(rng.integers(-127, 128, (4, 2, 3)).astype(np.int8)),
        "empty": Array(np.zeros((0, 4), dtype=np.float32)),
    })


def content() -> RecordDict:
    return RecordDict({"arrays": arrays(), "config": ConfigRecord({"server-round": 3}),
                       "one": ArrayRecord({"w": Array(np.ones(3, np.float32))}),
                       "metrics": MetricRecord({"loss": 0.5})})


def objects(record: RecordDict) -> int:
    """How many objects Flower sends for `record` (one request each)."""
    seen, stack = set(), [record]
    while stack:
        obj = stack.pop()
        if obj.object_id not in seen:
            seen.add(obj.object_id)
            stack.extend(obj.children.values() if obj.children else ())
    return len(seen)


def test_pack_and_unpack_give_back_every_array_byte_for_byte_in_order():
    original = content()
    packed = packing.pack(original)
    assert packing.is_packed(packed) and not packing.is_packed(original)
    assert list(packed["arrays"].keys()) == [packing.PACKED]
    assert list(packed["one"].keys()) == ["w"]  # one array: nothing to join
    assert packed["config"] == original["config"] and packed["metrics"] == original["metrics"]
    back = packing.unpack(packed)
    assert list(back.keys()) == list(original.keys())
    assert list(back["arrays"].keys()) == list(original["arrays"].keys())
    for name, array in original["arrays"].items():
        got = back["arrays"][name].numpy()
        want = array.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()
    assert packing.unpack(original) is original  # not packed: as it is
    with pytest.raises(packing.PackingError, match="packed already"):
        packing.pack(packed)


def test_a_packed_message_has_a_fraction_of_the_objects():
    rng = np.random.default_rng(1)  # distinct arrays: Flower sends equal objects once
    big = ArrayRecord({f"layer.{i}.lora_{ab}": Array(rng.standard_normal((8, 64)).astype(np.float32))
                       for i in range(8) for ab in "AB"})
    plain = RecordDict({"arrays": big, "config": ConfigRecord({"server-round": 1})})
    assert objects(plain) >= 2 * 16
    assert objects(packing.pack(plain)) <= 7


@pytest.mark.parametrize("damage, error", [
    (lambda index: index.__setitem__("names", ["a"]), "does not describe"),
    (lambda index: index.__setitem__("shapes", [9, 16, 16, 8, 4, 2, 3, 0, 4]), "runs past"),
    (lambda index: index.__setitem__("shapes", [1, 16, 16, 8, 4, 2, 3, 0, 4]), "left over"),
    (lambda index: index.pop("dtypes"), "without 'dtypes'"),
])
def test_a_damaged_index_is_refused_naming_the_record(damage, error):
    packed = packing.pack(content())
    damage(packed[f"{packing.INDEX_PREFIX}arrays"])
    with pytest.raises(packing.PackingError, match=error) as raised:
        packing.unpack(packed)
    assert "'arrays'" in str(raised.value) or "arrays" in str(raised.value)


def test_an_index_without_its_record_is_refused():
    packed = packing.pack(content())
    packed[f"{packing.INDEX_PREFIX}gone"] = ConfigRecord({"names": ["x"]})
    with pytest.raises(packing.PackingError, match="gone"):
        packing.unpack(packed)


class PackingInProcessGrid(InProcessGrid):
    """The in-process grid with every message packed on the way to the ClientApp, the
    reply checked to be packed and unpacked on the way back, as a deployed grid does."""

    packed_replies = 0

    def send_and_receive(self, messages, *, timeout=None):
        sent = []
        for message in messages:
            message.content = packing.pack(message.content)
            sent.append(message)
        replies = super().send_and_receive(sent, timeout=timeout)
        for reply in replies:
            if reply.has_content() and reply.content.array_records:  # train: the adapter
                assert packing.is_packed(reply.content), "the ClientApp must answer packed"
                assert all(list(r.keys()) == [packing.PACKED] for r in reply.content.array_records.values())
                PackingInProcessGrid.packed_replies += 1
                reply.content = packing.unpack(reply.content)
        return replies


def test_a_federation_with_packed_messages_trains_exactly_as_one_without(tmp_path):
    from fedcl.client.app import app as client_app
    from fedcl.config import load_config
    from fedcl.server.app import main as server_main

    set_task_identity()
    small = ["model.name=tiny-llama", "data.max_records=40", "data.max_test_records=16", "train.local_steps=2",
             "train.batch_size=4", "federation.clients=2", "federation.rounds=2"]
    results = {}
    for name, grid_class in (("plain", InProcessGrid), ("packed", PackingInProcessGrid)):
        config = load_config(None, small + [f"run.out_dir={tmp_path / name}"])
        flat = config.to_flat()
        server_main(grid_class(client_app, 2, flat), server_context(flat))
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert PackingInProcessGrid.packed_replies == 2 * 2  # train replies, 2 clients, 2 rounds
    for plain, packed in zip(results["plain"]["rounds"], results["packed"]["rounds"]):
        assert plain["eval"] == packed["eval"]
        assert [c["train_loss"] for c in plain["clients"]] == [c["train_loss"] for c in packed["clients"]]
    for round_dir in ("round-1", "round-2"):
        a = (tmp_path / "plain" / "adapters" / round_dir / "adapter_model.safetensors").read_bytes()
        b = (tmp_path / "packed" / "adapters" / round_dir / "adapter_model.safetensors").read_bytes()
        assert a == b
