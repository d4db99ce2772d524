"""The coordinator's Control API does not answer a node.

Real processes (`fedcl deploy coordinator`: flower-superlink on loopback, the Fleet
gateway on 0.0.0.0, the mutual-TLS control proxy; `fedcl deploy control-tunnel`;
one flower-supernode), started once for the module. What a node holds (the
deployment's ca.crt and its own node key) and where it can connect (the Fleet
address, and any of the coordinator's non-loopback addresses) must not list or
submit runs; an operator's certificate through the tunnel can, and the node still
joins through the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.deployment


def _non_loopback_ipv4() -> str | None:
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def _client(address: str, ca_cert: Path):
    """What `flwr` builds for a connection (Flower's own Control API client)."""
    from flwr.supercore.control import ControlHttpClient

    return ControlHttpClient.from_server_address(address, insecure=False,
                                                 root_certificates=ca_cert.read_bytes(), interceptors=[])


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    from fedcl.ops.deploy import launch as L
    from fedcl.ops.deploy.certs import generate_certs

    root = tmp_path_factory.mktemp("control")
    files = generate_certs(root / "keys", ["hospital-a"])
    link, fleet, control, tunnel = (L.free_port() for _ in range(4))
    env = {"root": root, "files": files, "home": root / "flwr-home", "started": [],
           "superlink": f"127.0.0.1:{link}", "fleet": f"127.0.0.1:{fleet}",
           "control": f"127.0.0.1:{control}", "tunnel": f"127.0.0.1:{tunnel}", "link_port": link}
    try:
        # The operator's tunnel first: it only listens until a connection comes.
        tun = L.launch("tunnel", ["fedcl", "deploy", "control-tunnel", "--proxy", env["control"],
                                  "--cert", str(files.operator_cert("operator")),
                                  "--key", str(files.operator_key("operator")),
                                  "--ca-cert", str(files.ca_cert), "--listen", env["tunnel"]],
                       log=root / "logs" / "tunnel.log")
        env["started"].append(tun)
        env["coordinator"] = L.start_coordinator(
            files, database=root / "superlink.db", log=root / "logs" / "coordinator.log",
            superlink=env["superlink"], fleet=f"0.0.0.0:{fleet}", control=f"0.0.0.0:{control}")
        env["started"].insert(0, env["coordinator"])
        L.wait_for(lambda: L._port_open("127.0.0.1", tunnel), timeout=30, what="the tunnel", process=tun)
        # The operator registers the node through the tunnel; the node starts now and
        # joins through the gateway while the refusals below are checked.
        from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` sends
        from flwr.proto.control_pb2 import RegisterNodeRequest

        public = try_load_public_key(files.node_public_key("hospital-a"))
        with_tunnel = _client(env["tunnel"], files.ca_cert)
        with_tunnel.RegisterNode(RegisterNodeRequest(public_key=public, name="hospital-a"))
        with_tunnel.close()
        (root / "a.jsonl").write_text('{"text": "x", "label": "Acne"}\n', encoding="utf-8")
        env["node"] = L.start_supernode(
            files, "hospital-a", superlink=env["fleet"], runtime_port=L.free_port(),
            data_file=root / "a.jsonl", state_dir=root / "state", partition_id=0,
            log=root / "logs" / "hospital-a.log")
        env["started"].append(env["node"])
        yield env
    finally:
        for proc in reversed(env["started"]):
            proc.stop()


def test_node_credentials_cannot_list_or_submit_runs_at_the_fleet_address(coordinator):
    import httpx
    from flwr.proto.control_pb2 import ListRunsRequest, StartRunRequest

    from fedcl.ops.deploy import launch as L

    files = coordinator["files"]
    node = _client(coordinator["fleet"], files.ca_cert)  # TLS verifies: the node trusts this address
    for call, request in ((node.ListRuns, ListRunsRequest()), (node.StartRun, StartRunRequest())):
        with pytest.raises(httpx.HTTPStatusError) as err:
            call(request)
        assert err.value.response.status_code == 404, err.value
    node.close()
    # The ServerApp runtime API shares the SuperLink's port too: not served here either.
    with httpx.Client(verify=str(files.ca_cert)) as raw:
        reply = raw.post(f"https://{coordinator['fleet']}/v1/runtime/v1/get-run", content=b"")
        assert reply.status_code == 404 and b"Fleet API" in reply.content

    # The real CLI, with a connection made of exactly what a node holds.
    L.write_connection(coordinator["home"], "node", coordinator["fleet"], files.ca_cert)
    done = subprocess.run([str(L.BIN / "flwr"), "ls", "node", "--format", "json"], capture_output=True,
                          text=True, env=L.flwr_env(coordinator["home"]), timeout=60)
    out = json.loads(done.stdout)
    assert out["success"] is False and "404" in out["error-message"], done.stdout
    log = coordinator["coordinator"].tail(1_000_000)
    assert "refused POST /v1/control/list-runs" in log and "refused POST /v1/control/start-run" in log
    assert "ControlServicer.ListRuns" not in log and "ControlServicer.StartRun" not in log  # never forwarded


def test_the_superlink_port_is_not_reachable_from_a_non_loopback_address(coordinator):
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with socket.socket() as s:
        s.settimeout(5)
        assert s.connect_ex((address, coordinator["link_port"])) != 0  # loopback-only listener
    fleet_port = int(coordinator["fleet"].rsplit(":", 1)[1])
    with socket.create_connection((address, fleet_port), timeout=5):
        pass  # the same address reaches the Fleet gateway: the refusal above is the binding


@contextlib.contextmanager
def _tunnel_with(ctx: ssl.SSLContext, proxy: str):
    """An in-process control tunnel whose TLS client side is `ctx` (any credential)."""
    from fedcl.ops.deploy.control_proxy import Forward, parse_address
    from fedcl.ops.deploy.launch import free_port

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    listen = ("127.0.0.1", free_port())
    forward = Forward(listen, parse_address(proxy, what="proxy"), upstream_tls=ctx,
                      upstream_hostname="127.0.0.1")
    server = asyncio.run_coroutine_threadsafe(forward.start(), loop).result(10)
    try:
        yield f"{listen[0]}:{listen[1]}"
    finally:
        async def shutdown() -> None:
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.parametrize("credential, accepted", [
    ("operator", True), ("none", False), ("server-cert-from-the-node-ca", False),
    ("stranger-operator-ca", False)])
def test_the_control_proxy_answers_only_an_operator_certificate(coordinator, credential, accepted,
                                                                tmp_path):
    import httpx
    from flwr.proto.control_pb2 import ListRunsRequest

    from fedcl.ops.deploy.certs import generate_certs

    files = coordinator["files"]
    ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    if credential == "operator":
        ctx.load_cert_chain(files.operator_cert("operator"), files.operator_key("operator"))
    elif credential == "server-cert-from-the-node-ca":  # signed by the CA every node trusts
        ctx.load_cert_chain(files.server_cert, files.server_key)
    elif credential == "stranger-operator-ca":
        other = generate_certs(tmp_path / "other", ["x"], operators=["mallory"])
        ctx.load_cert_chain(other.operator_cert("mallory"), other.operator_key("mallory"))
    refusals = coordinator["coordinator"].tail(1_000_000).count("fedcl.control_proxy refused")
    with _tunnel_with(ctx, coordinator["control"]) as address:
        client = _client(address, files.ca_cert)
        try:
            if accepted:
                assert list(client.ListRuns(ListRunsRequest()).run_dict) == []
            else:
                # TLS 1.3: the proxy checks the client's certificate after the client's
                # side of the handshake, so the refusal ends the connection mid-request.
                with pytest.raises(httpx.TransportError):
                    client.ListRuns(ListRunsRequest())
        finally:
            client.close()
    if not accepted:  # and the coordinator's log says so
        from fedcl.ops.deploy.launch import wait_for

        wait_for(lambda: coordinator["coordinator"].tail(1_000_000).count("fedcl.control_proxy refused")
                 > refusals, timeout=10, what="the proxy's refusal in its log")


def test_an_operator_lists_runs_through_the_tunnel_and_the_node_joins_through_the_gateway(coordinator):
    from flwr.proto.control_pb2 import ListNodesRequest

    from fedcl.ops.deploy import launch as L

    home, files = coordinator["home"], coordinator["files"]
    L.write_connection(home, "operator", coordinator["tunnel"], files.ca_cert)
    out = json.loads(L.flwr(["ls", "operator", "--format", "json"], home).stdout)
    assert out["success"] is True and out["runs"] == []
    operator = _client(coordinator["tunnel"], files.ca_cert)
    L.wait_for(lambda: [n.status for n in operator.ListNodes(ListNodesRequest()).nodes_info] == ["online"],
               timeout=60, what="hospital-a online through the Fleet gateway",
               process=coordinator["node"])
    operator.close()
    assert "(operator) -> 127.0.0.1" in coordinator["coordinator"].tail(1_000_000)  # the proxy saw its CN


@pytest.mark.parametrize("method, path, forwarded", [
    ("POST", "/v1/fleet/pull-messages", True), ("POST", "/v1/fleet/push-object", True),
    ("GET", "/v1/fleet/pull-messages", False), ("POST", "/v1/control/list-runs", False),
    ("POST", "/v1/runtime/v1/get-run", False), ("GET", "/health", False), ("GET", "/docs", False),
    ("POST", "/v1/fleet/../control/list-runs", False), ("POST", "/v1/fleet/%2e%2e/control/start-run", False),
    ("POST", "/v1/fleet//x", False), ("POST", "/v1/fleetx", False)])
def test_the_fleet_gateway_forwards_fleet_calls_only(method, path, forwarded):
    from fedcl.ops.deploy.fleet_gateway import is_fleet_request

    assert is_fleet_request(method, path) is forwarded


@pytest.mark.parametrize("case, message", [
    ("superlink on every interface", "loopback only"), ("tunnel on every interface", "loopback only"),
    ("proxy without the operator CA", "no such file"), ("address without a host", "HOST:PORT"),
    ("coordinator without its keys", "no ca.crt")])
def test_unsafe_or_broken_front_settings_are_refused(tmp_path, case, message):
    from fedcl.ops.deploy.certs import generate_certs
    from fedcl.ops.deploy.control_proxy import ProxyError, control_proxy, control_tunnel, parse_address
    from fedcl.ops.deploy.certs import DeployFiles
    from fedcl.ops.deploy.coordinator import check_superlink_address, run_coordinator

    f = generate_certs(tmp_path / "k", ["a"])
    cases = {
        "superlink on every interface": lambda: check_superlink_address("0.0.0.0:9091"),
        "tunnel on every interface": lambda: control_tunnel(
            listen="0.0.0.0:9099", proxy="h:9092", cert=f.operator_cert("operator"),
            key=f.operator_key("operator"), ca_cert=f.ca_cert),
        "proxy without the operator CA": lambda: control_proxy(
            listen="0.0.0.0:9092", superlink="127.0.0.1:9091", cert=f.server_cert, key=f.server_key,
            operator_ca=f.root / "missing.crt"),
        "address without a host": lambda: parse_address("9092", what="--control"),
        "coordinator without its keys": lambda: run_coordinator(
            DeployFiles(tmp_path / "none"), superlink="127.0.0.1:9091", fleet="0.0.0.0:9093",
            control=None, database=tmp_path / "db"),
    }
    with pytest.raises(ProxyError, match=message):
        cases[case]()
    assert not (tmp_path / "db").exists()  # refused before anything started


def test_operator_certificates_come_from_their_own_ca(tmp_path, capsys):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from fedcl.ops.cli import main
    from fedcl.ops.deploy.certs import DeployFiles

    out = tmp_path / "k"
    assert main(["deploy", "certs", "--out", str(out), "--institutions", "a", "--operators", "alice"]) == 0
    assert main(["deploy", "operator", "--out", str(out), "--name", "bob"]) == 0
    files = DeployFiles(out)
    ca = x509.load_pem_x509_certificate(files.operator_ca_cert.read_bytes())
    assert ca.subject != x509.load_pem_x509_certificate(files.ca_cert.read_bytes()).subject
    for name in ("alice", "bob"):
        cert = x509.load_pem_x509_certificate(files.operator_cert(name).read_bytes())
        cert.verify_directly_issued_by(ca)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert files.operator_key(name).stat().st_mode & 0o777 == 0o600
    assert files.operator_ca_key.stat().st_mode & 0o777 == 0o600
    assert main(["deploy", "operator", "--out", str(tmp_path / "nowhere"), "--name", "carol"]) == 2
    assert "no operator CA key" in capsys.readouterr().err
    assert main(["deploy", "operator", "--out", str(out), "--name", "Carol Smith"]) == 2
    assert "'Carol Smith'" in capsys.readouterr().err
