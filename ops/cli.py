"""The `fedcl` command line: simulate, plan, report, privacy, deploy, tune.

Every command checks its inputs before it writes anything: a bad config key,
model name or data file ends the command with a message naming it, exit
status 2, and no run folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import fedcl  # noqa: F401  (offline defaults)
from fedcl.config import Config, ConfigError, explicit_keys, load_config, warn_ineffective
from fedcl.ops.preflight import UsageError, preflight

# Convenience flags and the config keys they set.
FLAGS = {
    "model": ("model.name", str), "clients": ("federation.clients", int),
    "clients_per_round": ("federation.clients_per_round", int), "rounds": ("federation.rounds", int),
    "local_steps": ("train.local_steps", int), "lr": ("train.lr", float),
    "batch_size": ("train.batch_size", int), "lora_r": ("lora.r", int),
    "lora_alpha": ("lora.alpha", int), "lora_targets": ("lora.target_modules", str),
    "seed": ("train.seed", int), "strategy": ("strategy.name", str),
}


def add_config_args(p) -> None:
    """--config, --set and the convenience flags, shared by commands that build a Config."""
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   dest="overrides", help="override any config key (repeatable)")
    for flag, (key, typ) in FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), type=typ, metavar=key.split(".")[-1].upper(),
                       help=f"sets {key}")


def flag_values(args) -> dict:
    """The config keys the convenience flags given on the command line set."""
    return {key: getattr(args, name) for name, (key, _) in FLAGS.items()
            if getattr(args, name, None) is not None}


def add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="run a federation on Flower's simulation engine",
                       description="Run (or resume) a simulated federation. Settings come from "
                       "the defaults, --config FILE, then --set and the flags below.")
    add_config_args(p)
    p.add_argument("--data", metavar="FILE", help="your own JSONL/CSV file (sets data.path)")
    p.add_argument("--state-dir", metavar="DIR", help="root of the clients' own state folders")
    p.add_argument("--out", metavar="DIR", help="run folder to create (default: runs/<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last completed round")


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="print a run's memory and time plan (nothing is loaded)",
                       description="Estimate the memory (weights, activations, per-sample gradients, "
                       "optimiser state) and FLOPs of one training step, and the threads per process, "
                       "for the same settings as `fedcl simulate`; --model also takes a shape name "
                       "(e.g. deepseek-llm-7b) that is planned without weights. Warns when the "
                       "device cannot hold it.")
    add_config_args(p)


def cmd_plan(args) -> int:
    from fedcl.plan import format_plan, plan_run

    flags = flag_values(args)
    config = load_config(args.config, args.overrides)
    config = config.replace(flags, source="flags") if flags else config
    print(format_plan(plan_run(config), config))
    return 0


def resolve_config(args) -> tuple[Config, Path]:
    """The run's config and folder, from a fresh start or from the run being resumed."""
    flags = flag_values(args)
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.toml").is_file():
            raise UsageError(f"--resume {run}: not a fedcl run folder (no config.toml)")
        allowed = {"federation.rounds", "federation.timeout"}
        changed = set(flags) | {o.partition("=")[0].strip() for o in args.overrides}
        given = [flag for flag, value in (("--config", args.config), ("--data", args.data),
                                          ("--state-dir", args.state_dir), ("--out", args.out)) if value]
        if given or changed - allowed:
            refused = ", ".join(given + sorted(changed - allowed))
            raise UsageError("--resume continues a run with its own config; only --rounds and "
                             f"federation.timeout may change (got {refused})")
        config = load_config(run / "config.toml", args.overrides)
        # The folder resumed is the folder written: a copied run folder's config.toml
        # still names the original's run.out_dir.
        flags["run.out_dir"] = str(run.resolve())
        return config.replace(flags, source="--resume"), run
    config = load_config(args.config, args.overrides)
    set_by_user = explicit_keys(args.config, args.overrides) | set(flags)  # before --data adds its own
    if args.data:
        flags.update({"data.path": args.data, "data.dataset": ""})
    if args.state_dir:
        flags["run.state_dir"] = str(Path(args.state_dir).resolve())
    config = config.replace(flags, source="flags") if flags else config
    out = Path(args.out or config.run.out_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not an empty folder; "
                         f"use --resume {out} to continue it, or choose another folder")
    warn_ineffective(config, set_by_user)
    return config.replace({"run.out_dir": str(out.resolve())}, source="--out"), out


def cmd_simulate(args) -> int:
    from fedcl.ops.run import simulate
    from fedcl.ops.summary import print_summary
    from fedcl.rundir import RunDir

    config, out = resolve_config(args)
    if config.continual_on:  # tasks x rounds_per_task rounds, known once the stream is built
        from fedcl.continual.schedule import resolve_rounds

        planned = config.federation.rounds
        config = resolve_rounds(config)
        if planned != config.federation.rounds:
            print(f"continual: {config.federation.rounds} rounds (tasks x continual.rounds_per_task) "
                  f"replace federation.rounds={planned}", file=sys.stderr)
    run_dir = RunDir(out)
    done = run_dir.completed_rounds()
    if args.resume and done >= config.federation.rounds:
        print(f"{out}: already has {done} rounds; pass --rounds N with N > {done} to add more")
        return 0
    if args.resume:
        run_dir.check()  # every state file the server will read, before anything is written
    preflight(config)
    simulate(config)
    finished = run_dir.completed_rounds()
    if finished < config.federation.rounds:
        print(f"fedcl: error: the run stopped after round {finished} of {config.federation.rounds}; "
              f"see the log above, then `fedcl simulate --resume {out}` continues it",
              file=sys.stderr)
        return 1
    metrics = run_dir.metrics()
    print_summary(metrics, out)
    nothing = no_update_counted(metrics, since=done)
    if nothing:
        print(f"fedcl: error: {nothing}; the global adapter in {out} is the one it started from", file=sys.stderr)
        return 1
    return 0


def no_update_counted(metrics: dict, *, since: int = 0) -> str | None:
    """Why no client update counted in the rounds after `since`, or None when one did."""
    from fedcl import keys

    rounds = [r for r in metrics.get(keys.ROUNDS, []) if r.get(keys.ROUND, 0) > since]
    if not rounds:
        return None
    counted, reasons = 0, []
    for record in rounds:
        for client in record.get(keys.CLIENTS, []):
            if keys.CLIENT_REJECTED in client:
                reasons.append(str(client[keys.CLIENT_REJECTED]))
            elif int(client.get(keys.STATUS, keys.STATUS_OK)) == keys.STATUS_OK:
                counted += 1
    if counted:
        return None
    totals = {what: sum(int(r.get(key, 0)) for r in rounds)
              for what, key in (("failed", keys.FAILURES), ("rejected", keys.REJECTED),
                                ("refused (privacy budget)", keys.REFUSED), ("idle (no task data)", keys.IDLE))}
    said = ", ".join(f"{n} {what}" for what, n in totals.items() if n) or "no replies"
    first = f" (first reason: {reasons[0]})" if reasons else ""
    return f"no client update counted in {len(rounds)} round(s): {said}{first}"


def cmd_report(args) -> int:
    from fedcl.ops.report import write_report

    for path in write_report(Path(args.run_dir)):
        print(path)
    return 0


def cmd_privacy(args) -> int:
    from fedcl.privacy.report import find_ledgers, format_ledger

    root = Path(args.state_dir)
    try:
        paths = find_ledgers(root)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    print("\n\n".join(format_ledger(path, root) for path in paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcl", description=fedcl.__doc__)
    parser.add_argument("--version", action="version", version=f"fedcl {fedcl.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate(sub)
    add_plan(sub)
    rep = sub.add_parser("report", help="draw a run's curves as PNG files")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    priv = sub.add_parser("privacy", help="print the privacy ledgers found under a state folder")
    priv.add_argument("state_dir", metavar="STATE_DIR")
    from fedcl.ops.deploy import add_parser as add_deploy

    add_deploy(sub)
    from fedcl.ops.tuning.cli import add_parser as add_tune

    add_tune(sub)
    add_update(sub)
    return parser


def add_update(sub) -> None:
    p = sub.add_parser("update", help="train the next adapter version of a registry on new data",
                       description="Start from the registry's latest adapter (a fresh one when it "
                       "is empty), run the configured rounds on the new data (one --data file per "
                       "institution: client k holds one file), and commit the next version.")
    p.add_argument("--registry", metavar="REG", required=True, help="adapter registry folder")
    p.add_argument("--data", metavar="FILE", action="append", dest="data_files",
                   help="simulation: an institution's new JSONL/CSV file (repeatable)")
    p.add_argument("--deployment", metavar="CONNECTION",
                   help="run on a deployed federation instead: the `flwr` connection (in FLWR_HOME's "
                   "config.toml) of its SuperLink; each SuperNode trains on its own data-file")
    p.add_argument("--app", metavar="DIR", help="with --deployment: a staged app folder "
                   "(`fedcl deploy stage-app`; default: staged from this installation)")
    add_config_args(p)
    ver = sub.add_parser("versions", help="list an adapter registry's versions and lineage")
    ver.add_argument("registry", metavar="REG")


def cmd_update(args) -> int:
    from fedcl.ops.update import UpdateError, run_deployed_update, run_update
    from fedcl.ops.run import simulate

    if bool(args.data_files) == bool(args.deployment):
        raise UsageError("update: give the new data as --data FILE (simulation) or run on the nodes' "
                         "own data with --deployment CONNECTION, one of the two")
    flags = flag_values(args)
    config = load_config(args.config, args.overrides)
    config = config.replace(flags, source="flags") if flags else config
    warn_ineffective(config, explicit_keys(args.config, args.overrides) | set(flags))
    try:
        if args.deployment:
            record = run_deployed_update(config, args.registry, submit=_deployed_runner(args))
        else:
            record = run_update(config, args.registry, args.data_files, runner=simulate,
                                check=preflight)
    except UpdateError as err:
        print(f"fedcl: error: {err}", file=sys.stderr)
        return 1
    print(f"{args.registry}: committed {record['version']} (parent {record['parent'] or '-'})")
    return 0


def _deployed_runner(args):
    """Submit the job's run to the SuperLink of `flwr` connection --deployment and wait for it."""
    import tempfile

    from fedcl.ops.update import UpdateError
    from fedcl.ops.deploy.launch import run_on_federation, stage_app

    def submit(config) -> None:
        with tempfile.TemporaryDirectory(prefix="fedcl-app-") as tmp:
            app = Path(args.app) if args.app else stage_app(Path(__file__).resolve().parent.parent,
                                                          Path(tmp) / "app")
            status = run_on_federation(config, connection=args.deployment, app_dir=app)
        if status != "finished:completed":
            raise UpdateError(f"the run ended as {status!r}; the registry is unchanged")

    return submit


def cmd_versions(args) -> int:
    from fedcl.continual.registry import Registry
    from fedcl.ops.update import format_versions

    if not Path(args.registry).is_dir():
        raise UsageError(f"{args.registry}: no such registry folder")
    print(format_versions(Registry(args.registry).records()))
    return 0


def cmd_deploy(args) -> int:
    from fedcl.ops.deploy import cmd_deploy as run

    return run(args)


def cmd_tune(args) -> int:
    from fedcl.ops.tuning.cli import cmd_tune as run

    return run(args)


COMMANDS = {"simulate": cmd_simulate, "plan": cmd_plan, "report": cmd_report, "privacy": cmd_privacy,
            "deploy": cmd_deploy, "tune": cmd_tune, "update": cmd_update,
            "versions": cmd_versions}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ConfigError) as err:
        print(f"fedcl: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # DataError, ModelError, TaskError, AdapterError
        print(f"fedcl: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedcl: interrupted; completed rounds are kept (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
