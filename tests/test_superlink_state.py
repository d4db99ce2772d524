"""The SuperLink's SQLite state under a held lock: Flower's 5 s wait fails, fedcl's waits it out.

A real `SqlLinkState` on a file, as `flower-superlink --database FILE` opens it, and a
second connection holding the write lock the way a starved concurrent request does.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

pytestmark = pytest.mark.deployment

HELD_S = 6.5  # longer than Flower's 5 s busy timeout, shorter than fedcl's


def link_state(path):
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

    state = SqlLinkState(str(path), NoOpFederationManager(), ObjectStoreFactory().store())
    state.initialize()
    return state


def hold_write_lock(path, seconds: float) -> threading.Thread:
    """Take the database's write lock now and release it after `seconds`, in a thread."""
    conn = sqlite3.connect(str(path), timeout=0, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")

    def release():
        time.sleep(seconds)
        conn.rollback()
        conn.close()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def add_node(state, n: int) -> int:
    return state.create_node(f"owner-{n}", f"name-{n}", bytes([n]) * 32, 30.0)


@pytest.fixture
def flower_pragmas(monkeypatch):
    """Whatever a test installs, Flower's own pragmas are back afterwards."""
    import flwr.supercore.sql_mixin as sql_mixin

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    return dict(sql_mixin.SQLITE_PRAGMAS)


def test_flowers_state_fails_on_a_long_lock_and_fedcls_waits_it_out(tmp_path, flower_pragmas):
    from sqlalchemy.exc import OperationalError

    from fedcl.ops.deploy import superlink

    assert float(flower_pragmas["busy_timeout"]) / 1000 < HELD_S < superlink.BUSY_TIMEOUT_S
    db = tmp_path / "superlink.db"

    flowers = link_state(db)
    add_node(flowers, 1)
    holder = hold_write_lock(db, HELD_S)
    start = time.monotonic()
    with pytest.raises(OperationalError, match="database is locked"):
        add_node(flowers, 2)
    assert time.monotonic() - start < HELD_S
    holder.join()

    assert superlink.install() == superlink.BUSY_TIMEOUT_S
    ours = link_state(db)
    holder = hold_write_lock(db, HELD_S)
    start = time.monotonic()
    node = add_node(ours, 3)
    waited = time.monotonic() - start
    holder.join()
    assert waited >= HELD_S - 0.5
    assert ours.get_node_id_by_public_key(bytes([3]) * 32) == node
    assert flowers.get_node_id_by_public_key(bytes([2]) * 32) is None  # the failed write left nothing


def test_install_keeps_flowers_other_pragmas(flower_pragmas):
    import flwr.supercore.sql_mixin as sql_mixin

    from fedcl.ops.deploy import superlink

    superlink.install(timeout_s=12.5)
    pragmas = dict(sql_mixin.SQLITE_PRAGMAS)
    assert pragmas["busy_timeout"] == "12500"
    assert {k: v for k, v in pragmas.items() if k != "busy_timeout"} == \
        {k: v for k, v in flower_pragmas.items() if k != "busy_timeout"}


@pytest.mark.parametrize("raw, problem", [("soon", "is not a number"), ("0", "more than 0"),
                                          ("-3", "more than 0")])
def test_bad_busy_timeout_setting_is_named(monkeypatch, raw, problem):
    from fedcl.ops.deploy import superlink

    monkeypatch.setenv(superlink.ENV, raw)
    with pytest.raises(SystemExit, match=problem) as err:
        superlink.busy_timeout_s()
    assert superlink.ENV in str(err.value) and "hint" in str(err.value)
    monkeypatch.setenv(superlink.ENV, "45")
    assert superlink.busy_timeout_s() == 45.0


def test_superlink_command_runs_through_the_wrapper():
    from pathlib import Path

    from fedcl.ops.deploy import launch
    from fedcl.ops.deploy.certs import DeployFiles

    command = launch.superlink_command(DeployFiles(Path("/keys")), host="127.0.0.1", port=9091,
                                       database=Path("/state/superlink.db"))
    assert command[:3] == ["python", "-m", "fedcl.ops.deploy.superlink"]
    assert (launch.BIN / command[0]).exists()


@pytest.fixture
def flower_state_code(monkeypatch):
    """Whatever a test patches into Flower's SQL state, Flower's own code is back afterwards."""
    import flwr.supercore.sql_mixin as sql_mixin
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    monkeypatch.setattr(sql_mixin.SqlMixin, "session", sql_mixin.SqlMixin.session)
    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", SqlCoreState._cleanup_expired_task_tokens)


def _write_while_another_holds_a_transaction(state, hold_s: float) -> tuple[Exception | None, float]:
    """Thread A writes in a transaction it keeps open for `hold_s`; meanwhile this thread writes."""
    inside, failure = threading.Event(), []

    def holder():
        with state.session():
            add_node(state, 10)  # the write lock is taken here and kept until the session ends
            inside.set()
            time.sleep(hold_s)

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(5)
    start = time.monotonic()
    try:
        add_node(state, 11)
    except Exception as err:  # noqa: BLE001 - the test reports what Flower raised
        failure.append(err)
    waited = time.monotonic() - start
    thread.join()
    return (failure[0] if failure else None), waited


def test_serialised_transactions_queue_instead_of_failing_on_the_lock(tmp_path, flower_pragmas,
                                                                     flower_state_code):
    from sqlalchemy.exc import OperationalError

    from fedcl.ops.deploy import superlink

    superlink.install(timeout_s=0.2)  # a short lock wait, so that a collision shows at once
    plain = link_state(tmp_path / "plain.db")
    error, _ = _write_while_another_holds_a_transaction(plain, 1.0)
    assert isinstance(error, OperationalError) and "database is locked" in str(error)

    superlink.serialise_transactions()
    superlink.serialise_transactions()  # a second install does not wrap twice
    queued = link_state(tmp_path / "queued.db")
    error, waited = _write_while_another_holds_a_transaction(queued, 1.0)
    assert error is None and waited >= 0.8
    assert queued.get_node_id_by_public_key(bytes([11]) * 32) is not None
    with queued.session():  # Flower nests sessions of one scope: the gate is re-entrant
        add_node(queued, 12)
    with pytest.raises(RuntimeError):  # a failed transaction still rolls back
        with queued.session():
            add_node(queued, 13)
            raise RuntimeError("request failed")
    assert queued.get_node_id_by_public_key(bytes([13]) * 32) is None
    assert queued.get_node_id_by_public_key(bytes([12]) * 32) is not None


def test_expired_claims_are_swept_at_most_once_per_interval(tmp_path, flower_state_code):
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    from fedcl.ops.deploy import superlink

    sweeps = []
    real = SqlCoreState._cleanup_expired_task_tokens

    def counted(self):
        sweeps.append(time.monotonic())
        real(self)

    SqlCoreState._cleanup_expired_task_tokens = counted
    state = link_state(tmp_path / "superlink.db")
    for _ in range(20):
        state.get_run_status({1})
    assert len(sweeps) == 20  # Flower's own: a sweep (two UPDATEs) before every status read

    superlink.throttle_token_cleanup(every_s=0.3)
    superlink.throttle_token_cleanup(every_s=0.3)  # installed once
    sweeps.clear()
    for _ in range(20):
        state.get_run_status({1})
    assert len(sweeps) == 1
    time.sleep(0.35)
    state.get_run_status({1})
    assert len(sweeps) == 2  # after the interval the next read sweeps again
    other = link_state(tmp_path / "other.db")
    other.get_run_status({1})
    assert len(sweeps) == 3  # each state keeps its own interval
