"""`fedcl deploy coordinator`: the coordinator's SuperLink with its Control API
closed to nodes.

One process that starts `flower-superlink` on loopback (Control, Fleet and the
ServerApp runtime on one port, as Flower 1.42 does) and serves, in front of it:

    --fleet   HOST:PORT  the node-facing address: TLS, Fleet API paths only (fleet_gateway)
    --control HOST:PORT  operators: mutual TLS with the operator CA, then the SuperLink (control_proxy)

and stops the SuperLink (and the SuperExec and ServerApps under it) when it is
stopped, or exits with the SuperLink's code if that dies. The same command line
is `launch.coordinator_command` (tests) and docker/compose.yml's superlink service.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
from pathlib import Path

from fedcl.ops.deploy.certs import DeployFiles
from fedcl.ops.deploy.control_proxy import ProxyError, control_proxy, parse_address

LOOPBACK = ("127.0.0.1", "localhost")  # the names superlink.crt carries (certs.DEFAULT_HOSTS)


def check_superlink_address(address: str) -> tuple[str, int]:
    host, port = parse_address(address, what="--superlink")
    if host not in LOOPBACK:
        raise ProxyError(f"--superlink {address}: the SuperLink serves its Control API without "
                         "authentication, so it must listen on loopback only (e.g. 127.0.0.1:9091); "
                         "nodes use --fleet, operators --control")
    return host, port


def start_link(files: DeployFiles, *, superlink: str, database: Path, log: Path | None):
    """flower-superlink on the loopback address, as a child in its own session."""
    from fedcl.ops.deploy import launch

    host, port = check_superlink_address(superlink)
    database.parent.mkdir(parents=True, exist_ok=True)
    command = launch.superlink_command(files, host=host, port=port, database=database)
    out = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")  # noqa: SIM115 - the child holds it for its life
    proc = subprocess.Popen([str(launch.BIN / command[0]), *command[1:]], stdout=out,
                            stderr=subprocess.STDOUT if out else None, env=launch.flwr_env(None),
                            start_new_session=True)
    link = launch.Launched("superlink", proc, log or Path("/dev/null"))
    launch.wait_for(lambda: launch._port_open(host, port), timeout=60,
                    what=f"SuperLink on {host}:{port}", process=link)
    return link


async def serve_front(files: DeployFiles, *, superlink: str, fleet: str, control: str | None,
                      link, stopping: asyncio.Event) -> None:
    """The Fleet gateway and the control proxy, until `stopping` is set or the SuperLink dies."""
    import uvicorn

    from fedcl.ops.deploy.fleet_gateway import FleetGateway

    link_host, link_port = check_superlink_address(superlink)
    fleet_host, fleet_port = parse_address(fleet, what="--fleet")
    gateway = FleetGateway(f"https://{link_host}:{link_port}", ca_cert=files.ca_cert)
    server = uvicorn.Server(uvicorn.Config(
        gateway, host=fleet_host, port=fleet_port, ssl_certfile=str(files.server_cert),
        ssl_keyfile=str(files.server_key), log_level="warning", access_log=False, lifespan="on"))
    server.install_signal_handlers = lambda: None  # ours below stop everything together
    tasks = [asyncio.create_task(server.serve())]
    if control is not None:
        proxy = control_proxy(listen=control, superlink=superlink, cert=files.server_cert,
                              key=files.server_key, operator_ca=files.operator_ca_cert)
        listener = await proxy.start()
        tasks.append(asyncio.create_task(listener.serve_forever()))
    logging.getLogger("fedcl.coordinator").info(
        "fleet gateway on %s, control proxy on %s, SuperLink on %s", fleet, control or "(none)", superlink)
    while not stopping.is_set() and link.alive() and not any(t.done() for t in tasks):
        try:
            await asyncio.wait_for(stopping.wait(), timeout=0.5)
        except asyncio.TimeoutError:
            pass
    server.should_exit = True
    for task in tasks[1:]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()


def run_coordinator(files: DeployFiles, *, superlink: str, fleet: str, control: str | None,
                    database: Path, log: Path | None = None) -> int:
    """Start everything, block until SIGTERM/SIGINT or the SuperLink's exit; return an exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per forwarded Fleet call
    check_superlink_address(superlink)
    parse_address(fleet, what="--fleet")
    for path in (files.ca_cert, files.server_cert, files.server_key):
        if not path.is_file():
            raise ProxyError(f"--keys {files.root}: no {path.name} there; make the folder with "
                             "`fedcl deploy certs --out DIR ...`")
    if control is not None:
        parse_address(control, what="--control")
        if not files.operator_ca_cert.is_file():
            raise ProxyError(f"{files.operator_ca_cert}: no operator CA; `fedcl deploy certs` writes "
                             "one (or pass --no-control and run `flwr` on this host only)")
    link = start_link(files, superlink=superlink, database=database, log=log)
    try:
        async def main() -> None:
            stopping = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stopping.set)
            await serve_front(files, superlink=superlink, fleet=fleet, control=control,
                              link=link, stopping=stopping)

        asyncio.run(main())
    finally:
        died = not link.alive()
        link.stop()
    return link.proc.returncode if died and link.proc.returncode else 0
