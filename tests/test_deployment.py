"""The real deployment path: a SuperLink and three SuperNodes as separate processes
on 127.0.0.1, with TLS and node authentication, plus the in-process check that
only adapter arrays and numbers leave a client. The SuperLink runs as
`fedcl deploy coordinator` does it: on loopback, the nodes through the Fleet gateway.

The end-to-end test runs one federation of two rounds and, along the way,
kills a SuperNode in round 1 (the run goes on without it), stops the SuperLink
after round 1 and starts it again from its database (a resubmitted run resumes
from the checkpoint), and checks that an unregistered node and a node trusting
another CA are refused. Every process is stopped by its own id at the end,
also when the test fails.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.deployment

REPO = Path(__file__).resolve().parents[1]
INSTITUTIONS = ["hospital-a", "hospital-b", "hospital-c"]
LABELS = ["Acne", "Birth Control", "Depression", "Pain"]
CONNECTION = "fedcl-test"


def write_data(folder: Path) -> dict[str, Path]:
    """Each institution's own file, and the coordinator's test file (built-in demo text)."""
    from fedcl import data
    from fedcl.config import Config

    dataset = data.load_dataset(Config().data, seed=0)
    files = {}
    for i, name in enumerate([*INSTITUTIONS, "server"]):
        records = dataset.test[:24] if name == "server" else dataset.train[i::3][:16]
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                                       for r in records), encoding="utf-8")
    return files


def write_run_config(path: Path, server_data: Path, *, dp: bool) -> Path:
    privacy = "[privacy]\ntarget_epsilon = 8.0\n" if dp else ""
    path.write_text(f"""[model]
name = "tiny-llama"
[data]
dataset = ""
path = "{server_data}"
labels = "{','.join(LABELS)}"
max_records = 16
[train]
batch_size = 4
local_steps = 2
[federation]
clients = 3
min_replies = 1
# How long a round's train (and evaluate) step waits for replies: bounds what a dead
# node costs. Each message starts a fresh ClientApp process (about 30-45 s for three
# nodes on 2 cores), so this must stay well above that.
timeout = 75
{privacy}""", encoding="utf-8")
    return path


def privacy_available() -> bool:
    from fedcl import config

    return hasattr(config, "PrivacyConfig")


class Deployment:
    """The processes of one test deployment; `stop_all` ends every one by id."""

    def __init__(self, root: Path):
        from fedcl.ops.deploy import launch
        from fedcl.ops.deploy.certs import generate_certs

        self.L = launch
        self.root = root
        self.home = root / "flwr-home"
        self.files = generate_certs(root / "keys", [*INSTITUTIONS, "unregistered"])
        self.port = launch.free_port()
        self.address = f"127.0.0.1:{self.port}"  # the SuperLink on loopback: flwr on this host
        self.fleet = f"127.0.0.1:{launch.free_port()}"  # the nodes' door: the Fleet API only
        self.started: list = []
        self.link = None
        self.nodes: dict[str, object] = {}

    def start_link(self, log_name: str = "superlink.log"):
        self.link = self.L.start_coordinator(self.files, database=self.root / "superlink.db",
                                             log=self.root / "logs" / log_name, superlink=self.address,
                                             fleet=self.fleet, control=None, flwr_home=self.home)
        self.started.append(self.link)
        return self.link

    def start_node(self, name: str, partition_id: int, data_file: Path, **kw):
        node = self.L.start_supernode(self.files, name, superlink=self.fleet,
                                      runtime_port=self.L.free_port(), data_file=data_file,
                                      state_dir=self.root / "state" / name, partition_id=partition_id,
                                      log=self.root / "logs" / f"{name}.log", flwr_home=self.home, **kw)
        self.started.append(node)
        self.nodes[name] = node
        return node

    def online_nodes(self) -> int:
        out = self.L.flwr(["supernode", "ls", CONNECTION, "--format", "json"], self.home).stdout
        return sum(1 for n in json.loads(out).get("nodes", []) if n.get("status") == "online")

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


@pytest.fixture
def deployment(tmp_path):
    dep = Deployment(tmp_path)
    yield dep
    dep.stop_all()
    if os.environ.get("FEDCL_KEEP_DEPLOY_LOGS"):
        print(f"logs in {tmp_path / 'logs'}")


def checkpoint_round(run_dir: Path) -> int:
    ck = run_dir / "checkpoint.json"
    return json.loads(ck.read_text())["round"] if ck.exists() else 0


def test_tls_auth_deployment_survives_a_dead_node_and_a_superlink_restart(deployment, tmp_path):
    dep, L = deployment, deployment.L
    started = time.monotonic()
    data = write_data(tmp_path)
    dp = privacy_available()
    run_config = {"config": str(write_run_config(tmp_path / "deploy.toml", data["server"], dp=dp)),
                  "run.out_dir": str(tmp_path / "run"), "federation.rounds": 2}
    app = L.stage_app(REPO, tmp_path / "app")
    run_dir = tmp_path / "run"

    dep.start_link()
    L.write_connection(dep.home, CONNECTION, dep.address, dep.files.ca_cert)
    for i, name in enumerate(INSTITUTIONS):
        L.register_node(dep.files, name, CONNECTION, dep.home)
        dep.start_node(name, i, data[name])

    # Refused: a key the SuperLink never registered, and a node that trusts another CA.
    from fedcl.ops.deploy.certs import generate_certs

    stranger_ca = generate_certs(tmp_path / "other-ca", ["x"]).ca_cert
    rogue = dep.start_node("unregistered", 0, data["hospital-a"])
    wrong_ca = dep.L.launch("wrong-ca", L.supernode_command(
        dep.files, "hospital-a", superlink=dep.fleet, runtime_port=L.free_port(),
        data_file=data["hospital-a"], state_dir=tmp_path / "state" / "wrong-ca", partition_id=0,
        root_certificates=stranger_ca) + ["--max-retries", "2"], log=tmp_path / "logs" / "wrong-ca.log",
        flwr_home=dep.home)
    dep.started.append(wrong_ca)
    L.wait_for(lambda: dep.online_nodes() == 3, timeout=60, what="three SuperNodes online")

    run_id = L.submit_run(app, CONNECTION, run_config, dep.home)
    # Kill hospital-c mid-round (SIGKILL, with its ClientApp): once round 1 reached it.
    L.wait_for(lambda: "Receiving: train message" in dep.nodes["hospital-c"].tail(100_000), timeout=90,
               what="hospital-c receiving round 1", process=dep.nodes["hospital-c"])
    dep.nodes["hospital-c"].stop(kill=True)

    # Round 1 completes without it; then the SuperLink (and the ServerApp under it) stop.
    L.wait_for(lambda: checkpoint_round(run_dir) >= 1, timeout=300, what="round 1 checkpoint",
               process=dep.link)
    dep.link.stop()
    assert checkpoint_round(run_dir) == 1, "the SuperLink was stopped before round 2 completed"
    round_1 = json.loads((run_dir / "metrics.json").read_text())["rounds"]

    # Refusals, checked while the run went on: both nodes gave up (Flower's exit code 305,
    # "could not establish a connection") and never got a node id.
    for refused, reason in ((rogue, "Failed to activate SuperNode"),
                            (wrong_ca, "CERTIFICATE_VERIFY_FAILED")):
        L.wait_for(lambda: not refused.alive(), timeout=60, what=f"{refused.name} to give up")
        log = refused.tail(20_000)
        assert refused.proc.returncode != 0 and "Exit Code: 305" in log and reason in log, log
        assert "SuperNode ID" not in log, log
    assert "No SuperNode found with the given public key" in dep.link.tail(1_000_000)
    rogue.stop()
    wrong_ca.stop()

    # Same port, same database: the registered nodes reconnect; a resubmitted run resumes.
    dep.start_link("superlink-restarted.log")
    L.wait_for(lambda: dep.online_nodes() >= 2, timeout=90, what="nodes back after the restart")
    L.submit_run(app, CONNECTION, run_config, dep.home)
    L.wait_for(lambda: checkpoint_round(run_dir) >= 2, timeout=300, what="round 2 checkpoint",
               process=dep.link)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["rounds"][:1] == round_1  # resumed: round 1 was not run again
    ids = [sorted(c["id"] for c in r["clients"]) for r in metrics["rounds"]]
    assert ids == [[0, 1], [0, 1]], ids  # hospital-c died before replying, and stayed away
    for record in metrics["rounds"]:
        assert {"accuracy", "macro_f1"} <= set(record["eval"])
        assert record["bytes_up"] > 0
    if dp:
        assert all("epsilon" in c for r in metrics["rounds"] for c in r["clients"]), metrics["rounds"]
        assert (tmp_path / "state" / "hospital-a").is_dir()
    assert (run_dir / "adapters" / "round-2" / "adapter_model.safetensors").is_file()

    # A continual-update job on the same federation, through the real CLI: one round on the
    # nodes' own files, committed as the registry's first version with each node's fingerprint.
    import subprocess
    import sys

    from fedcl import data as fdata
    from fedcl.config import load_config

    registry = tmp_path / "registry"
    done = subprocess.run([sys.executable, "-m", "fedcl.ops.cli", "update", "--registry", str(registry),
                           "--deployment", CONNECTION, "--app", str(app), "--config", run_config["config"],
                           "--rounds", "1"], env=L.flwr_env(dep.home), capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    version = json.loads((registry / "versions" / "v0001" / "version.json").read_text())
    cfg = load_config(run_config["config"]).data
    for i, name in enumerate(INSTITUTIONS[:2]):
        assert version["data_fingerprints"][f"node {i}"] == fdata.fingerprint(fdata.load_records(data[name], cfg))
    assert (registry / "versions" / "v0001" / "adapter" / "adapter_model.safetensors").is_file()
    print(f"deployment e2e: {time.monotonic() - started:.0f} s, run {run_id}, dp={dp}")


def test_certs_are_written_with_private_modes(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from fedcl.ops.deploy.certs import generate_certs

    files = generate_certs(tmp_path / "k", ["hospital-a", "hospital-b"], hosts=["10.1.2.3", "link.example"])
    for private in (files.ca_key, files.server_key, files.node_key("hospital-a")):
        assert private.stat().st_mode & 0o777 == 0o600, private
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"link.example", "localhost"}
    key = load_ssh_private_key(files.node_key("hospital-b").read_bytes(), password=None)
    assert key.curve.name == "secp384r1"
    assert load_ssh_public_key(files.node_public_key("hospital-b").read_bytes()).curve.name == "secp384r1"
    assert not list(tmp_path.rglob(".*.tmp*")) and not list((tmp_path / "k").glob(".*"))


@pytest.mark.parametrize("names, message", [
    ([], "at least one"), (["Hospital A"], "lowercase"), (["a", "a"], "more than once")])
def test_certs_refuse_bad_institution_names(tmp_path, names, message):
    from fedcl.ops.deploy.certs import CertError, generate_certs

    with pytest.raises(CertError, match=message):
        generate_certs(tmp_path / "k", names)
    assert not (tmp_path / "k").exists()


def test_certs_refuse_to_overwrite(tmp_path):
    from fedcl.ops.deploy.certs import CertError, generate_certs

    generate_certs(tmp_path, ["a"])
    with pytest.raises(CertError, match="already holds a CA"):
        generate_certs(tmp_path, ["a"])


def test_nothing_but_adapter_arrays_and_numbers_leaves_a_client(tmp_path):
    """Every reply a client sends (train and evaluate, every round) holds only float
    arrays named like adapter tensors and numeric metrics: no text, no token ids."""
    from flwr.app import Message

    from fedcl.client.app import app as client_app
    from fedcl.federation.engine import with_run_config
    from fedcl import data as fdata
    from fedcl.config import load_config
    from fedcl.server.app import main as server_main
    from fedcl.federation.grid import InProcessGrid, server_context

    config = load_config(None, ["model.name=tiny-llama", "data.max_records=48", "data.max_test_records=16",
                                "train.local_steps=2", "train.batch_size=4", "federation.clients=2",
                                "federation.rounds=2", f"run.out_dir={tmp_path / 'run'}"])
    run_config = config.to_flat()
    dataset = fdata.load_dataset(config.data, seed=config.train.seed)
    texts = [r["text"] for r in dataset.train] + [r["label"] for r in dataset.train]
    seen: list[Message] = []

    def capture(partition_id: int, reply: Message) -> Message:
        seen.append(reply)
        return reply

    grid = InProcessGrid(with_run_config(client_app, run_config), 2, run_config, intercept=capture)
    server_main(grid, server_context(run_config))
    assert len(seen) == 2 * 2 * 2  # 2 clients x 2 rounds x (train + evaluate)
    for reply in seen:
        assert not reply.has_error()
        content = reply.content
        assert not content.config_records, "a client reply carries no config/strings"
        for record in content.metric_records.values():
            for key, value in record.items():
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        for record in content.array_records.values():
            for name, array in record.items():
                assert "lora_" in name, name
                values = array.numpy()
                assert np.issubdtype(values.dtype, np.floating), (name, values.dtype)
        blob = repr(content)
        assert not any(t in blob for t in texts if len(t) > 3)


def test_compose_runs_the_commands_the_native_test_runs():
    """docker/compose.yml uses the flags of launch.superlink_command / supernode_command."""
    import yaml

    from fedcl.ops.deploy import launch
    from fedcl.ops.deploy.certs import DeployFiles

    compose = yaml.safe_load((REPO / "docker" / "compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"superlink", *INSTITUTIONS}

    def flags(command: list[str]) -> list[str]:
        return sorted(arg.split("=", 1)[0] for arg in command if arg.startswith("--"))

    native_link = launch.coordinator_command(DeployFiles(Path("/keys")), database=Path("/state/superlink.db"),
                                             superlink="127.0.0.1:9091", fleet="0.0.0.0:9093",
                                             control="0.0.0.0:9092")
    link = services["superlink"]
    assert link["entrypoint"] + link["command"] == native_link  # the SuperLink itself on loopback only
    for i, name in enumerate(INSTITUTIONS):
        native = launch.supernode_command(DeployFiles(Path("/keys")), name, superlink="superlink:9093",
                                          runtime_port=9094, data_file=Path(f"/data/{name}.jsonl"),
                                          state_dir=Path("/state"), partition_id=i)
        command = services[name]["command"]
        assert flags(command) == flags(native)
        assert f"--node-config={native[native.index('--node-config') + 1]}" in command
        assert "healthcheck" in services[name]


def test_fedcl_deploy_certs_command(tmp_path, capsys):
    from fedcl.ops.cli import main

    assert main(["deploy", "certs", "--out", str(tmp_path / "k"), "--institutions", "hospital-a,hospital-b",
                 "--host", "10.0.0.7"]) == 0
    assert (tmp_path / "k" / "nodes" / "hospital-b.key.pub").is_file()
    assert main(["deploy", "certs", "--out", str(tmp_path / "k"), "--institutions", "hospital-a"]) == 2
    assert "already holds a CA" in capsys.readouterr().err
    assert main(["deploy", "certs", "--out", str(tmp_path / "j"), "--institutions", "Hospital A"]) == 2
    assert "'Hospital A'" in capsys.readouterr().err and not (tmp_path / "j").exists()


def test_deployed_nodes_read_their_own_files_whatever_their_id(tmp_path):
    """Node config as a deployed SuperNode gives it: data-file, state-dir, partition-id 0..2."""
    from fedcl.client.app import app as client_app
    from fedcl.federation.engine import with_run_config
    from fedcl.server.app import main as server_main
    from fedcl.federation.grid import InProcessGrid, server_context

    data = write_data(tmp_path)
    run_config = {"config": str(write_run_config(tmp_path / "deploy.toml", data["server"], dp=False)),
                  "federation.rounds": 1, "run.out_dir": str(tmp_path / "run")}
    grid = InProcessGrid(with_run_config(client_app, run_config), 3, run_config)
    for i, node in enumerate(grid.node_ids):
        grid.contexts[node].node_config = {"data-file": str(data[INSTITUTIONS[i]]), "partition-id": i,
                                           "state-dir": str(tmp_path / "state" / INSTITUTIONS[i])}
    server_main(grid, server_context(run_config))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    clients = metrics["rounds"][0]["clients"]
    assert [c["id"] for c in clients] == [0, 1, 2] and metrics["rounds"][0]["failures"] == 0
    assert all(c["num_examples"] > 0 for c in clients)


def test_kept_model_deployment_counts_every_reply_when_a_worker_dies_after_charging(deployment, tmp_path,
                                                                                     monkeypatch):
    """Each SuperNode with its worker (model kept loaded). hospital-c's serving process
    exits right after every ledger write, before its reply leaves (the worst moment):
    its supervisor starts another, the ClientApp sends the message once more, and the
    round still counts all three replies, each round charged once."""
    from fedcl.privacy.client import EXIT_AFTER_CHARGE_ENV
    from fedcl.privacy.ledger import LEDGER_FILE, PrivacyLedger

    dep, L = deployment, deployment.L
    data = write_data(tmp_path)
    config = write_run_config(tmp_path / "deploy.toml", data["server"], dp=True)
    text = config.read_text().replace("min_replies = 1", "min_replies = 3").replace("timeout = 75", "timeout = 240")
    config.write_text(text)
    run_dir = tmp_path / "run"
    app = L.stage_app(REPO, tmp_path / "app")
    dep.start_link()
    L.write_connection(dep.home, CONNECTION, dep.address, dep.files.ca_cert)
    for i, name in enumerate(INSTITUTIONS):
        L.register_node(dep.files, name, CONNECTION, dep.home)
        if name == "hospital-c":
            monkeypatch.setenv(EXIT_AFTER_CHARGE_ENV, "1")
        dep.start_node(name, i, data[name], worker=True)
        monkeypatch.delenv(EXIT_AFTER_CHARGE_ENV, raising=False)
    L.wait_for(lambda: dep.online_nodes() == 3, timeout=90, what="three SuperNodes online")
    L.submit_run(app, CONNECTION, {"config": str(config), "run.out_dir": str(run_dir), "federation.rounds": 2},
                 dep.home)
    L.wait_for(lambda: checkpoint_round(run_dir) >= 2, timeout=900, what="round 2 checkpoint", process=dep.link)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [sorted(c["id"] for c in r["clients"]) for r in metrics["rounds"]] == [[0, 1, 2], [0, 1, 2]]
    logs = tmp_path / "logs"
    assert (logs / "hospital-c-worker.log").read_text().count("exited (75); restarting") >= 2
    for name in INSTITUTIONS:
        assert "not reachable after" not in (logs / f"{name}.log").read_text()  # every message via the worker
        assert (logs / f"{name}-worker.log").read_text().count("| train | message") >= 2
        entries = PrivacyLedger.load(tmp_path / "state" / name / LEDGER_FILE).entries
        assert [e["round"] for e in entries] == [1, 2] and len({e["message"] for e in entries}) == 2, entries


def test_supernode_retries_a_superlink_500_on_repeatable_fleet_calls_a_bounded_number_of_times():
    """Flower's SuperNode gives up on an HTTP 500 (its message loop then ends while its
    heartbeat keeps it online); fedcl's launcher runs it with 500s on repeatable Fleet
    calls retried, at most MAX_500_RETRIES in a row, and other calls as Flower does."""
    import httpx

    from fedcl.ops.deploy import supernode

    supernode.install()
    supernode.install()  # once is enough: not wrapped twice
    import flwr.supernode.fleet_http_connection as connection

    invoker = connection.make_simple_http_retry_invoker()

    def error(path: str, status: int = 500) -> httpx.HTTPStatusError:
        request = httpx.Request("POST", f"https://link:9093{path}")
        return httpx.HTTPStatusError("x", request=request, response=httpx.Response(status, request=request))

    pulls = [invoker.should_giveup(error("/v1/fleet/pull-messages")) for _ in range(supernode.MAX_500_RETRIES + 1)]
    assert pulls == [False] * supernode.MAX_500_RETRIES + [True]
    from flwr.supercore.retry.retry_invoker import RetryState

    invoker.on_success(RetryState(print, (), {}, tries=1, elapsed_time=0.0))  # a success ends the streak
    assert invoker.should_giveup(error("/v1/fleet/push-messages")) is False
    assert invoker.should_giveup(error("/v1/fleet/activate-node")) is True  # not repeated blindly
    assert invoker.should_giveup(error("/v1/fleet/pull-messages", 400)) is True
    assert invoker.should_giveup(error("/v1/fleet/pull-messages", 503)) is False  # Flower's own retry


def test_a_killed_supernode_rejoins_without_waiting_for_its_heartbeat_to_expire(deployment, tmp_path):
    """Flower's SuperLink holds a SIGKILLed node online until two heartbeat intervals
    (60 s) have passed and refuses to activate it again before then. fedcl's SuperNode
    recorded its id in its state folder, so the restarted process deactivates that id
    (signed with its own key) and activates at once."""
    from fedcl.ops.deploy import supernode

    dep, L = deployment, deployment.L
    data = write_data(tmp_path)
    dep.start_link()
    L.write_connection(dep.home, CONNECTION, dep.address, dep.files.ca_cert)
    L.register_node(dep.files, "hospital-a", CONNECTION, dep.home)
    first = dep.start_node("hospital-a", 0, data["hospital-a"])
    L.wait_for(lambda: "SuperNode ID:" in first.tail(100_000), timeout=60, what="hospital-a activated",
               process=first)
    id_file = tmp_path / "state" / "hospital-a" / supernode.NODE_ID_FILE
    node_id = int(id_file.read_text())
    assert f"SuperNode ID: {node_id}" in first.tail(100_000)
    assert id_file.stat().st_mode & 0o777 == 0o600
    first.stop(kill=True)

    again = L.start_supernode(dep.files, "hospital-a", superlink=dep.fleet, runtime_port=L.free_port(),
                              data_file=data["hospital-a"], state_dir=tmp_path / "state" / "hospital-a",
                              partition_id=0, log=tmp_path / "logs" / "hospital-a-again.log", flwr_home=dep.home)
    dep.started.append(again)
    L.wait_for(lambda: "SuperNode ID:" in again.tail(100_000), timeout=50, what="hospital-a activated again",
               process=again)
    log, link_log = again.tail(100_000), dep.link.tail(1_000_000)
    assert f"still holds node {node_id} online" in log and f"SuperNode ID: {node_id}" in log, log
    assert "Failed to activate SuperNode" not in log, log  # not Flower's refusal loop
    # The SuperLink: the old activation ended by the node's own request, then the same id back.
    assert link_log.index(f"Deactivated node_id={node_id}") < link_log.rindex(f"Activated node_id={node_id}")
    assert dep.online_nodes() == 1


def test_a_node_killed_mid_round_fails_that_round_at_once_and_serves_the_next(deployment, tmp_path):
    """hospital-b (node worker and executor) is SIGKILLed holding its round-1 message and
    started again: the restarted node stays offline for a moment, so the SuperLink answers
    the lost message with an error reply and round 1 ends with hospital-a's reply alone,
    far inside its 1,200 s timeout. With `min_replies = 2` the server asks for the next
    round only once two nodes are online, so the rejoined node serves every later round
    (without it, rounds of a second each would go on without a node still starting)."""
    dep, L = deployment, deployment.L
    data = write_data(tmp_path)
    run_dir = tmp_path / "run"
    run_config = {"config": str(write_run_config(tmp_path / "deploy.toml", data["server"], dp=False)),
                  "run.out_dir": str(run_dir), "federation.rounds": 4, "federation.clients": 2,
                  "federation.min_replies": 2, "federation.timeout": 1200}
    app = L.stage_app(REPO, tmp_path / "app")
    dep.start_link()
    L.write_connection(dep.home, CONNECTION, dep.address, dep.files.ca_cert)
    for i, name in enumerate(INSTITUTIONS[:2]):
        L.register_node(dep.files, name, CONNECTION, dep.home)
        dep.start_node(name, i, data[name], worker=True, executor=True)
    L.wait_for(lambda: dep.online_nodes() == 2, timeout=90, what="two SuperNodes online")

    L.submit_run(app, CONNECTION, run_config, dep.home)
    victim = dep.nodes["hospital-b"]
    L.wait_for(lambda: "Receiving: train message" in victim.tail(100_000), timeout=120,
               what="hospital-b receiving round 1", process=victim)
    victim.stop(kill=True)
    again = dep.start_node("hospital-b", 1, data["hospital-b"], worker=True, executor=True)
    # Bounded far below the round's timeout: a lost message that held the round would fail here.
    L.wait_for(lambda: checkpoint_round(run_dir) >= 4, timeout=400, what="round 4 checkpoint",
               process=dep.link)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    ids = [sorted(c["id"] for c in r["clients"]) for r in metrics["rounds"]]
    assert ids == [[0], [0, 1], [0, 1], [0, 1]], ids
    assert metrics["rounds"][0]["failures"] == 1  # the lost message, reported as a failure
    assert [r["failures"] for r in metrics["rounds"][1:]] == [0, 0, 0], metrics["rounds"]
    assert "still holds node" in again.tail(1_000_000)
