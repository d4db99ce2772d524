"""Real deployment: key material, and the Flower processes of a federation.

- `fedcl.ops.deploy.certs`: a CA, the SuperLink's TLS certificate, one node-auth key
  pair per institution (`fedcl deploy certs`).
- `fedcl.ops.deploy.launch`: the command lines of `flower-superlink`,
  `flower-supernode` and `flwr`, and helpers that start and stop them (used by
  tests/test_deployment.py; the README runs the same commands by hand).

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
    certs.add_argument("--overwrite", action="store_true", help="replace keys already in DIR")
    app = cmds.add_parser("stage-app", help="copy the Flower app's sources into DIR for `flwr run DIR`",
                          description="`flwr run .` walks every file under the folder (.venv "
                          "included) before filtering; a staged copy builds the bundle in seconds.")
    app.add_argument("--out", metavar="DIR", required=True)
    app.add_argument("--source", metavar="REPO", default=".", help="the fedcl repository (default: .)")
    app.add_argument("--overwrite", action="store_true",
                     help="replace DIR even if it holds files fedcl did not stage there")


def cmd_deploy(args) -> int:
    from fedcl.ops.deploy.certs import CertError, generate_certs
    from fedcl.ops.deploy.launch import StageError, stage_app

    if args.deploy_command == "certs":
        names = [n.strip() for n in args.institutions.split(",") if n.strip()]
        try:
            files = generate_certs(Path(args.out), names, hosts=args.host, overwrite=args.overwrite)
        except CertError as err:
            from fedcl.ops.preflight import UsageError

            raise UsageError(str(err)) from None
        print(f"CA:        {files.ca_cert}  (give to every SuperNode and the flwr connection)")
        print(f"SuperLink: {files.server_cert}, {files.server_key}")
        for name in names:
            print(f"{name}: {files.node_key(name)} (keep at the institution), "
                  f"{files.node_public_key(name)} (register with `flwr supernode register`)")
        return 0
    try:
        print(stage_app(Path(args.source), Path(args.out), overwrite=args.overwrite))
    except (FileNotFoundError, StageError) as err:
        from fedcl.ops.preflight import UsageError

        raise UsageError(str(err)) from None
    return 0
