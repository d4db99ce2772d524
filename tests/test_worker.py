"""A node's long-lived worker (`fedcl.client.worker`): what the ClientApp hands it
over its Unix socket, what comes back, and what survives a worker that dies.

These serve the real socket from a thread of the test process (the model then
loads once for all of them). The real supervisor and serving processes, with a
serving process that dies right after charging the ledger, run in
`tests/test_deployment.py` (marker `deployment`) behind real SuperNodes.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedcl.client import app as client_app
from fedcl.client import handlers, worker
from fedcl.config import load_config
from fedcl.federation.grid import InProcessGrid
from fedcl.federation.messages import state_to_arrays
from fedcl.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedcl.session import GlobalEvaluator

SMALL = ["model.name=tiny-llama", "data.max_records=40", "data.max_test_records=8", "train.local_steps=2",
         "train.batch_size=4", "federation.clients=2", "privacy.delta=1e-3"]


def run_config(tmp_path: Path, name: str = "run", *extra: str) -> dict:
    return load_config(None, SMALL + [f"run.out_dir={tmp_path / name}", *extra]).to_flat()


def train_body(flat: dict, server_round: int = 1) -> bytes:
    state = GlobalEvaluator(load_config(None, SMALL)).initial_state  # same model and adapter as every run here
    content = RecordDict({"arrays": state_to_arrays(state), "config": ConfigRecord({"server-round": server_round})})
    return recorddict_to_proto(content).SerializeToString()


def decode(body: bytes) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(body))


def same_reply(a: RecordDict, b: RecordDict) -> None:
    """Bit-identical arrays, identical metrics but for the seconds a step took."""
    assert list(a.array_records["arrays"]) == list(b.array_records["arrays"])
    for name, array in a.array_records["arrays"].items():
        np.testing.assert_array_equal(array.numpy(), b.array_records["arrays"][name].numpy(), err_msg=name)
    timing = {"train-seconds"}
    assert {k: v for k, v in a.metric_records["metrics"].items() if k not in timing} == \
           {k: v for k, v in b.metric_records["metrics"].items() if k not in timing}


class ThreadWorker:
    """The real listener and serve loop, in a thread of this process; `lose_first`
    handles the first message (charging its ledger) and closes without replying,
    as a serving process that died right then would."""

    def __init__(self, state_dir: Path, *, lose_first: bool = False):
        self.listener = worker.bind(state_dir)
        self.path, self.done, self.lost = worker.socket_path(state_dir), False, 0
        self.lose_first = lose_first
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        if self.lose_first:
            conn, _ = self.listener.accept()
            with conn:
                header, body = worker._recv(conn)
                worker.handle(header, body)  # trained and charged; the reply never leaves
                self.lost += 1
        self.listener.settimeout(0.2)
        worker.serve(self.listener, stop=lambda: self.done)

    def close(self):
        self.done = True
        self.thread.join(timeout=10)
        self.listener.close()


def forward(path, body, flat, node_config, message_id="m-1", kind="train"):
    return worker.forward(path, kind, body, run_config=flat, node_config=node_config, run_id=7,
                          message_id=message_id, wait=2)


def test_the_worker_replies_what_the_clientapp_would_and_two_runs_do_not_mix(tmp_path):
    state = tmp_path / "state"
    node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(state), "worker": "x"}
    run_a, run_b = run_config(tmp_path, "a"), run_config(tmp_path, "b", "train.lr=0.05", "train.seed=3")
    body_a, body_b = train_body(run_a), train_body(run_b)
    direct_a = handlers.train_content(decode(body_a), run_a, node_config)
    w = ThreadWorker(state)
    try:
        via_a = decode(forward(w.path, body_a, run_a, node_config))
        via_b = decode(forward(w.path, body_b, run_b, node_config))
        again_a = decode(forward(w.path, body_a, run_a, node_config))  # after run b used the same model
        evaluated = decode(forward(w.path, body_a, run_a, node_config, kind="evaluate"))
    finally:
        w.close()
    same_reply(via_a, direct_a)
    same_reply(again_a, direct_a)
    assert not np.array_equal(next(iter(via_b.array_records["arrays"].values())).numpy(),
                              next(iter(via_a.array_records["arrays"].values())).numpy())
    assert evaluated.metric_records["metrics"]["num-examples"] > 0 and not evaluated.array_records


def test_the_socket_is_the_node_users_alone_and_one_worker_per_folder(tmp_path):
    state = tmp_path / "a-rather-long-folder-name-to-pass-the-unix-socket-name-limit" / ("x" * 60) / "state"
    w = ThreadWorker(state)
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(w.path).st_mode) == 0o600
        with pytest.raises(worker.WorkerError, match="already serves this state folder"):
            worker.bind(state)
    finally:
        w.close()
    # A socket file left by a worker that died is replaced.
    assert w.path.exists()
    worker.bind(state).close()


def test_a_clientapp_without_a_reachable_worker_does_the_work_itself(tmp_path):
    flat = run_config(tmp_path)
    node_config = {"partition-id": 1, "num-partitions": 2, "worker": str(tmp_path / "none" / "worker.sock")}
    assert worker.forward(node_config["worker"], "train", b"", run_config=flat, node_config=node_config,
                          run_id=1, message_id="m", wait=0.3) is None
    grid = InProcessGrid(client_app.app, 2, flat)
    grid.contexts[grid.node_ids[1]].node_config = node_config
    msg = Message(content=decode(train_body(flat)), dst_node_id=grid.node_ids[1], message_type="train")
    reply = grid.send_and_receive([msg])[0]
    assert not reply.has_error() and reply.content.metric_records["metrics"]["train-steps"] == 2


def test_a_worker_error_fails_the_message_and_the_worker_serves_on(tmp_path):
    state = tmp_path / "state"
    flat = run_config(tmp_path)
    w = ThreadWorker(state)
    try:
        with pytest.raises(worker.WorkerError, match="failed: KeyError"):
            forward(w.path, train_body(flat), flat, {"state-dir": str(state)})  # no partition-id
        assert forward(w.path, train_body(flat), flat, {"partition-id": 0, "num-partitions": 2}) is not None
    finally:
        w.close()


def test_a_message_lost_after_its_charge_is_sent_again_and_charged_once(tmp_path):
    state = tmp_path / "state"
    flat = run_config(tmp_path, "run", "privacy.target_epsilon=6")
    node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(state)}
    w = ThreadWorker(state, lose_first=True)
    try:
        reply = decode(forward(w.path, train_body(flat), flat, node_config, message_id="m-17"))
        second = decode(forward(w.path, train_body(flat, 2), flat, node_config, message_id="m-18"))
    finally:
        w.close()
    assert w.lost == 1
    entries = PrivacyLedger.load(state / LEDGER_FILE).entries
    assert [(e["round"], e["message"]) for e in entries] == [(1, "m-17"), (2, "m-18")]
    assert reply.metric_records["metrics"]["epsilon"] == pytest.approx(entries[0]["epsilon"])
    assert second.metric_records["metrics"]["epsilon"] == pytest.approx(entries[1]["epsilon"])
