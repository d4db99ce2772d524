"""The node's long-lived ClientApp executor (`fedcl.client.executor`): the FAB check
in-process, and one real deployment where each SuperNode (`--isolation process`) has
its messages served by one executor process, a refused task reported to the server
and the next task still served."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_deployment import CONNECTION, Deployment, write_data, write_run_config

REPO = Path(__file__).resolve().parents[1]


def build_fab(app_dir: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    from fedcl.ops.deploy.launch import stage_app

    return stage_app(REPO, tmp_path_factory.mktemp("fab") / "app")


def test_the_installed_fedcls_own_fab_passes_the_check(staged):
    import hashlib

    from fedcl.client.executor import check_fab

    fab = build_fab(staged)
    compared = check_fab(fab, hashlib.sha256(fab).hexdigest())
    assert compared == len(list(staged.rglob("*.py")))  # every shipped .py file was compared


@pytest.mark.parametrize("change, refused", [
    (lambda app: (app / "client" / "node.py").write_text((app / "client" / "node.py").read_text() + "# other\n"),
     r"1 of the FAB.s \d+ fedcl files differ from this node.s installed fedcl \(client/node.py\)"),
    (lambda app: (app / "fedcl" / "extra_module.py").write_text("x = 1\n"), "fedcl/extra_module.py"),
    (lambda app: (app / "pyproject.toml").write_text((app / "pyproject.toml").read_text().replace(
        'clientapp = "fedcl.client.app:app"', 'clientapp = "mine.app:app"')), "ClientApp is 'mine.app:app'"),
])
def test_a_fab_that_is_not_the_installed_fedcl_is_refused_naming_why(staged, tmp_path, change, refused):
    import hashlib
    import shutil

    from fedcl.client.executor import FabMismatch, check_fab

    app = shutil.copytree(staged, tmp_path / "app")
    change(app)
    fab = build_fab(app)
    with pytest.raises(FabMismatch, match=refused):
        check_fab(fab, hashlib.sha256(fab).hexdigest())
    with pytest.raises(FabMismatch, match="hashes to .* not the run's"):
        check_fab(build_fab(staged), hashlib.sha256(fab).hexdigest())


TASK_LINE = re.compile(r"executor \| pid (\d+) \| task \d+ \| run (\d+) \| (\w+) \| [\d.]+ s \| served \d+ \| (ok|failed.*)")


@pytest.mark.deployment
def test_one_executor_process_serves_every_message_and_outlives_a_refused_task(tmp_path):
    """Two SuperNodes with executors (hospital-a's with a worker, hospital-b's running the
    handlers in the executor itself). Run 1's FAB differs from the installed fedcl: every
    task is refused and reported (error replies), the executors stay up; run 2 (the
    installed fedcl's FAB) completes its round with both replies, served by the same pids."""
    from fedcl.ops.deploy import launch as L

    dep = Deployment(tmp_path)
    names = ["hospital-a", "hospital-b"]
    try:
        data = write_data(tmp_path)
        config = write_run_config(tmp_path / "deploy.toml", data["server"], dp=False)
        config.write_text(config.read_text().replace("clients = 3", "clients = 2"))
        dep.start_link()
        L.write_connection(dep.home, CONNECTION, dep.address, dep.files.ca_cert)
        # Staged right before the executors start: they compare FABs with the files they found then.
        good = L.stage_app(REPO, tmp_path / "app")
        other = L.stage_app(REPO, tmp_path / "app-other")
        (other / "client" / "node.py").write_text((other / "client" / "node.py").read_text() + "# other\n")
        for i, name in enumerate(names):
            L.register_node(dep.files, name, CONNECTION, dep.home)
            dep.start_node(name, i, data[name], worker=(name == "hospital-a"), executor=True)
        L.wait_for(lambda: dep.online_nodes() == 2, timeout=90, what="two SuperNodes online")
        executors = {n: dep.nodes[n].companions[-1] for n in names}
        for number, app in ((1, other), (2, good)):
            run_id = L.submit_run(app, CONNECTION, {"config": str(config), "run.out_dir": str(tmp_path / f"run{number}"),
                                                    "federation.rounds": 1}, dep.home)
            L.wait_for(lambda: L.run_status(run_id, CONNECTION, dep.home).startswith("finished"), timeout=400,
                       what=f"run {number} to finish", process=dep.link, interval=2)
        assert all(e.alive() for e in executors.values())
    finally:
        dep.stop_all()

    refused = json.loads((tmp_path / "run1" / "metrics.json").read_text())["rounds"][0]
    assert refused["clients"] == [] and refused["failures"] == 2
    served = json.loads((tmp_path / "run2" / "metrics.json").read_text())["rounds"][0]
    assert sorted(c["id"] for c in served["clients"]) == [0, 1] and served["failures"] == 0
    logs = tmp_path / "logs"
    for name in names:
        tasks = TASK_LINE.findall((logs / f"{name}-executor.log").read_text())
        assert {pid for pid, *_ in tasks} == {str(executors[name].pid)}, tasks  # one process served them all
        outcomes = [(kind, state.split(" |")[0]) for _, _, kind, state in tasks]
        assert ("train", "failed") in outcomes and outcomes[-2:] == [("train", "ok"), ("evaluate", "ok")], tasks
        assert all("FabMismatch" in state and "client/node.py" in state for *_, state in tasks if state != "ok")
    assert (logs / "hospital-a-worker.log").read_text().count("| train | message") == 1
    assert not (logs / "hospital-b-worker.log").exists()


@pytest.mark.parametrize("flags, isolation, port", [
    (["--superlink", "h:9093"], ["--isolation", "process"], 9094),
    (["--port", "9101", "--isolation", "process"], [], 9101),
    (["--port=9102"], ["--isolation", "process"], 9102),
])
def test_deploy_node_executor_runs_the_supernode_in_process_isolation(flags, isolation, port):
    from fedcl.ops.deploy.node import executor_flags

    assert executor_flags(flags) == (flags + isolation, port)


@pytest.mark.parametrize("flags, message", [
    (["--isolation", "subprocess"], "leave --isolation out"),
    (["--host", "0.0.0.0"], "on 127.0.0.1 without TLS"),
    (["--ssl-certfile", "x.crt"], "Runtime API's --ssl-\\* flags"),
    (["--port", "nine"], "--port nine: not a port number"),
])
def test_deploy_node_executor_refuses_flags_it_cannot_serve(flags, message):
    from fedcl.ops.deploy.node import NodeError, executor_flags

    with pytest.raises(NodeError, match=message):
        executor_flags(flags)
