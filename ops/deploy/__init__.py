"""Real deployment: key material, and the Flower processes of a federation.

- `fedcl.ops.deploy.certs`: a CA, the SuperLink's TLS certificate, one node-auth key
  pair per institution (`fedcl deploy certs`).
- `fedcl.ops.deploy.launch`: the command lines of `flower-superlink`,
  `flower-supernode` and `flwr`, and helpers that start and stop them (used by
  tests/test_deployment.py; the README runs the same commands by hand).
- `fedcl.ops.deploy.coordinator`: `fedcl deploy coordinator`, the SuperLink on
  loopback behind the Fleet gateway (`fleet_gateway`, nodes) and the mutual-TLS
  control proxy (`control_proxy`, operators; `fedcl deploy control-tunnel` is the
  operator's end).
- `fedcl.ops.deploy.node`: `fedcl deploy node`, an institution's SuperNode with its
  long-lived worker (model kept loaded) next to it.

`fedcl deploy` is the command-line entry; its parser lives here so that
`ops/cli.py` only registers it.
"""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("deploy", help="key material and app bundle for a real deployment")
    cmds = p.add_subparsers(dest="deploy_command", required=True)
    certs = cmds.add_parser("certs", help="write a CA, the SuperLink's TLS pair and node auth keys",
                            description="Write DIR/ca.crt, DIR/superlink.{crt,key} (SAN: --host, "
                            "127.0.0.1, localhost) and DIR/nodes/<institution>.key[.pub] "
                            "(EC SECP384R1, OpenSSH). Private keys are mode 0600.")
    certs.add_argument("--out", metavar="DIR", required=True)
    certs.add_argument("--institutions", metavar="A,B,...", required=True,
                       help="comma-separated names: lowercase letters, digits, dashes")
    certs.add_argument("--host", metavar="HOST", action="append", default=[],
                       help="address the SuperNodes use to reach the SuperLink (repeatable)")
    certs.add_argument("--operators", metavar="A,B,...", default="operator",
                       help="who may use the Control API (flwr run/ls/register): one TLS client "
                       "certificate each, from a separate operator CA (default: operator)")
    certs.add_argument("--overwrite", action="store_true", help="replace keys already in DIR")
    operator = cmds.add_parser("operator", help="issue one more operator client certificate",
                               description="Write DIR/operators/NAME.{crt,key}, signed by "
                               "DIR/operators/ca.key.")
    operator.add_argument("--out", metavar="DIR", required=True)
    operator.add_argument("--name", required=True)
    _add_coordinator_parsers(cmds)
    node = cmds.add_parser("node", help="an institution's SuperNode with its worker (model kept loaded)",
                           usage="fedcl deploy node [--worker-log FILE] [--worker-timeout S] "
                           "[--executor [--executor-log FILE]] "
                           "-- FLOWER-SUPERNODE-FLAGS...",
                           description="Start the node's worker for the node config's state-dir, "
                           "then flower-supernode (SuperLink HTTP 500s retried) with "
                           "worker=<state-dir>/worker.sock added to --node-config.")
    node.add_argument("--worker-log", metavar="FILE", help="the worker's log (default: STATE-DIR/worker.log)")
    node.add_argument("--worker-timeout", metavar="S", type=float, default=60.0,
                      help="how long to wait for the worker's socket (default: 60)")
    node.add_argument("--executor", action="store_true",
                      help="the SuperNode in --isolation process, one long-lived executor serving every "
                      "message (fedcl.client.executor) instead of a ClientApp process per message")
    node.add_argument("--executor-log", metavar="FILE", help="the executor's log (default: STATE-DIR/executor.log)")
    node.add_argument("supernode_flags", nargs="*", metavar="FLOWER-SUPERNODE-FLAGS",
                      help="after --: flower-supernode's own flags, one --node-config among them")
    app = cmds.add_parser("stage-app", help="copy the Flower app's sources into DIR for `flwr run DIR`",
                          description="`flwr run .` walks every file under the folder (.venv "
                          "included) before filtering; a staged copy builds the bundle in seconds.")
    app.add_argument("--out", metavar="DIR", required=True)
    app.add_argument("--source", metavar="REPO", default=".", help="the fedcl repository (default: .)")
    app.add_argument("--overwrite", action="store_true",
                     help="replace DIR even if it holds files fedcl did not stage there")


def _add_coordinator_parsers(cmds) -> None:
    co = cmds.add_parser("coordinator", help="the SuperLink on loopback, a Fleet-only gateway for "
                         "nodes and a mutual-TLS Control proxy for operators",
                         description="Flower 1.42 serves Control, Fleet and the ServerApp runtime "
                         "on one port, with no Control API authentication: this binds the "
                         "SuperLink to loopback and puts two doors in front of it.")
    co.add_argument("--keys", metavar="DIR", required=True, help="the `fedcl deploy certs` folder")
    co.add_argument("--database", metavar="FILE", required=True, help="the SuperLink's state")
    co.add_argument("--superlink", metavar="HOST:PORT", default="127.0.0.1:9091",
                    help="the SuperLink itself: loopback only (default: 127.0.0.1:9091)")
    co.add_argument("--fleet", metavar="HOST:PORT", default="0.0.0.0:9093",
                    help="node-facing address: Fleet API only (default: 0.0.0.0:9093)")
    co.add_argument("--control", metavar="HOST:PORT", default="0.0.0.0:9092",
                    help="operators: mutual TLS, operator CA (default: 0.0.0.0:9092)")
    co.add_argument("--no-control", action="store_true",
                    help="no control proxy: `flwr` only on this host, at --superlink")
    co.add_argument("--log", metavar="FILE", help="the SuperLink's log (default: this output)")
    tun = cmds.add_parser("control-tunnel", help="an operator's end of the control proxy: "
                          "point `flwr` at --listen", description="`flwr` cannot present a TLS "
                          "client certificate; this listens on loopback and carries each "
                          "connection to the coordinator's --control address with yours.")
    tun.add_argument("--proxy", metavar="HOST:PORT", required=True, help="the coordinator's --control")
    tun.add_argument("--cert", metavar="FILE", required=True, help="operators/NAME.crt")
    tun.add_argument("--key", metavar="FILE", required=True, help="operators/NAME.key")
    tun.add_argument("--ca-cert", metavar="FILE", required=True, help="the deployment's ca.crt")
    tun.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:9099",
                     help="where `flwr` connects (loopback; default: 127.0.0.1:9099)")
    tun.add_argument("--proxy-hostname", metavar="NAME",
                     help="the name the coordinator's certificate carries, when --proxy's host "
                     "is not in it (e.g. an SSH forward)")


def _run_coordinator_command(args) -> int:
    import asyncio

    from fedcl.ops.deploy.certs import DeployFiles
    from fedcl.ops.deploy.control_proxy import ProxyError, control_tunnel, serve_forever
    from fedcl.ops.preflight import UsageError

    try:
        if args.deploy_command == "coordinator":
            from fedcl.ops.deploy.coordinator import run_coordinator

            return run_coordinator(DeployFiles(Path(args.keys)), superlink=args.superlink,
                                   fleet=args.fleet, control=None if args.no_control else args.control,
                                   database=Path(args.database),
                                   log=Path(args.log) if args.log else None)
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        tunnel = control_tunnel(listen=args.listen, proxy=args.proxy, cert=Path(args.cert),
                                key=Path(args.key), ca_cert=Path(args.ca_cert),
                                proxy_hostname=args.proxy_hostname)
    except ProxyError as err:
        raise UsageError(str(err)) from None
    try:
        asyncio.run(serve_forever(tunnel))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_deploy(args) -> int:
    from fedcl.ops.deploy.certs import CertError, generate_certs, write_operator
    from fedcl.ops.deploy.launch import StageError, stage_app

    if args.deploy_command in ("coordinator", "control-tunnel"):
        return _run_coordinator_command(args)
    if args.deploy_command == "node":
        from fedcl.ops.deploy.node import NodeError, run_node
        from fedcl.ops.preflight import UsageError

        try:
            return run_node(args.supernode_flags, worker_log=Path(args.worker_log) if args.worker_log else None,
                            worker_timeout=args.worker_timeout, executor=args.executor,
                            executor_log=Path(args.executor_log) if args.executor_log else None)
        except NodeError as err:
            raise UsageError(str(err)) from None
    if args.deploy_command == "operator":
        from fedcl.ops.deploy.certs import DeployFiles

        try:
            files = DeployFiles(Path(args.out))
            write_operator(files, args.name)
        except CertError as err:
            from fedcl.ops.preflight import UsageError

            raise UsageError(str(err)) from None
        print(f"operator {args.name}: {files.operator_cert(args.name)}, {files.operator_key(args.name)}")
        return 0
    if args.deploy_command == "certs":
        names = [n.strip() for n in args.institutions.split(",") if n.strip()]
        operators = [n.strip() for n in args.operators.split(",") if n.strip()]
        try:
            files = generate_certs(Path(args.out), names, hosts=args.host, operators=operators,
                                   overwrite=args.overwrite)
        except CertError as err:
            from fedcl.ops.preflight import UsageError

            raise UsageError(str(err)) from None
        print(f"CA:        {files.ca_cert}  (give to every SuperNode and the flwr connection)")
        print(f"SuperLink: {files.server_cert}, {files.server_key}")
        for name in names:
            print(f"{name}: {files.node_key(name)} (keep at the institution), "
                  f"{files.node_public_key(name)} (register with `flwr supernode register`)")
        print(f"Operator CA: {files.operator_ca_cert} (the coordinator's control proxy only)")
        for name in operators:
            print(f"operator {name}: {files.operator_cert(name)}, {files.operator_key(name)} "
                  "(keep with the operator; never give to a node)")
        return 0
    try:
        print(stage_app(Path(args.source), Path(args.out), overwrite=args.overwrite))
    except (FileNotFoundError, StageError) as err:
        from fedcl.ops.preflight import UsageError

        raise UsageError(str(err)) from None
    return 0
