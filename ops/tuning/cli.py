"""`fedcl tune`: search hyperparameters with Optuna, every trial a federated run.

    fedcl tune --config BASE.toml --space SPACE.toml --trials 8 --sampler tpe \\
               --storage sqlite:///DIR/study.db --out DIR
    fedcl tune --report --storage sqlite:///DIR/study.db --out DIR [--pick N]

The base config and the search space are checked before any trial runs.
Running the same command again continues the study up to --trials finished
trials; DIR/best.toml is the best trial's config for `fedcl simulate --config`.
"""

from __future__ import annotations

from pathlib import Path

from fedcl.ops.tuning.study import PRUNERS, SAMPLERS, SPLITS


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="search hyperparameters with Optuna (each trial a simulation)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="FILE", help="base TOML config of every trial")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   dest="overrides", help="override a base config key (repeatable)")
    p.add_argument("--space", metavar="FILE", help="TOML search space: one table per config key")
    p.add_argument("--trials", type=int, metavar="N",
                   help="finished trials the study should hold in total (complete or pruned)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--pruner", choices=PRUNERS, default="median",
                   help="median: stop a trial whose round metric falls below the median of "
                   "earlier trials (rounds > 1; runs rounds one engine start at a time)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage (default sqlite:///OUT/study.db)")
    p.add_argument("--study-name", default="fedcl", metavar="NAME")
    p.add_argument("--out", metavar="DIR", required=True, help="study folder: trials/, best.toml, plots")
    p.add_argument("--objective", default="accuracy", metavar="METRIC",
                   help="accuracy, macro_f1 or recall:LABEL (final round, on --split)")
    p.add_argument("--split", choices=SPLITS, default="validation",
                   help="score trials on the clients' validation splits (held out of their training "
                   "records, data.eval_fraction; default) or on the server's test split")
    p.add_argument("--multi-objective", action="store_true",
                   help="maximise the objective and minimise the epsilon spent: a Pareto front")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--state-dir", metavar="DIR",
                   help="the clients' state folders: every DP trial is charged to their ledgers")
    p.add_argument("--report", action="store_true",
                   help="print the best trials (or the Pareto front) and draw plots; no trials run")
    p.add_argument("--pick", type=int, metavar="TRIAL", help="with --report: write this trial's "
                   "config to OUT/best.toml")


def cmd_tune(args) -> int:
    from fedcl.ops.preflight import UsageError

    if args.report:
        return _report(args)
    if args.pick is not None:
        raise UsageError("--pick goes with --report")
    missing = [flag for flag, value in (("--space", args.space), ("--trials", args.trials)) if value is None]
    if missing:
        raise UsageError(f"tune: {' and '.join(missing)} required (or --report)")
    return _tune(args)


def _options(args, **extra):
    from fedcl.ops.tuning.study import TuneOptions

    return TuneOptions(trials=args.trials or 1, sampler=args.sampler, storage=args.storage or "",
                       study_name=args.study_name, objective=args.objective,
                       multi_objective=args.multi_objective, pruner=args.pruner, seed=args.seed,
                       split=args.split,
                       state_dir=str(Path(args.state_dir).resolve()) if args.state_dir else "", **extra)


def _tune(args) -> int:
    from fedcl.config import load_config
    from fedcl.ops.preflight import preflight
    from fedcl.ops.tuning.report import print_report, write_plots
    from fedcl.ops.tuning.space import load_space
    from fedcl.ops.tuning.study import PRIVACY_NOTE, Objective, check_objective, run_study

    options = _options(args)
    base = load_config(args.config, args.overrides)
    space = load_space(args.space, base)
    if options.sampler == "grid":
        space.grid()  # a continuous range without step is an error now, not at trial 0
    check_objective(base, Objective.parse(options.objective), options.split)
    preflight(base)  # model, data, split and DP plan of the base config
    out = Path(args.out)
    print(PRIVACY_NOTE)
    if base.privacy.enabled and not options.state_dir:
        print("privacy: DP is on but no --state-dir: each trial's ledger lives in its own trial "
              "folder, so no ledger shows what the whole study spent")
    try:
        study = run_study(base, space, out, options)
    except KeyboardInterrupt:
        print(f"tune: interrupted; the running trial is marked failed and finished trials are kept "
              f"in {options.storage or out / 'study.db'}; run the same command to continue")
        return 130
    except RuntimeError as err:
        print(f"fedcl: error: {err}")
        return 1
    print_report(study)
    for path in write_plots(study, out):
        print(path)
    if options.multi_objective:
        print("no best.toml: pick a point of the front with --report --pick TRIAL")
    else:
        print(f"best trial {study.best_trial.number}: {out / 'best.toml'} "
              f"(fedcl simulate --config {out / 'best.toml'})")
    return 0


def _report(args) -> int:
    import optuna

    from fedcl.ops.preflight import UsageError
    from fedcl.ops.tuning.report import print_report, write_plots
    from fedcl.ops.tuning.study import open_storage, write_best

    out = Path(args.out)
    url = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise UsageError(f"--report: no study database at {url[len('sqlite:///'):]}")
    try:
        study = optuna.load_study(study_name=args.study_name, storage=open_storage(url))
    except KeyError:
        raise UsageError(f"--report: no study {args.study_name!r} in {url}") from None
    print_report(study)
    for path in write_plots(study, out):
        print(path)
    if args.pick is not None:
        print(write_best(study, out, args.pick))
    return 0
