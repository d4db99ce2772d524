"""Run an Optuna study whose trials are real federated runs.

Each trial takes the base config, applies the sampled values, and runs the
federation into its own run folder `OUT/trials/trial-<n>` through a *runner*:
by default `fedcl.ops.run.simulate`, Flower's simulation engine
exactly as `fedcl simulate` uses it. (Tests pass an in-process runner that
drives the same ServerApp and ClientApp without Ray.) The trial's value is
read back from the run folder's metrics.json after the final round: by default
(`split = "validation"`) the clients' evaluations of their validation splits,
held out of their training records (`data.eval_fraction`), so that choosing
the best trial never looks at the test split; `split = "test"` scores the
server's test split instead. In multi-objective mode it is (utility, epsilon).

Pruning: with a pruner, a trial runs its rounds one at a time through the run
folder's resume (round k is `federation.rounds = k` on the same folder), reports
each round's metric and stops when the pruner says so. Every step is a new
engine start (Ray takes ~15 s or more), so stepping is only used when it pays
(rounds > 1, one objective) and when it leaves the run unchanged: a DP
`target_epsilon` calibrates noise to the planned number of rounds, so such
trials run whole and report their rounds afterwards.

The study lives in an Optuna storage (SQLite by default). A trial that raises
or is interrupted is marked FAIL; `trials` counts finished (complete or
pruned) trials in the study, so re-running adds only what is missing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from fedcl import keys
from fedcl.atomic import write_text
from fedcl.config import Config, ConfigError
from fedcl.ops.tuning.space import SearchSpace
from fedcl.rundir import RunDir

SAMPLERS = ("grid", "random", "tpe", "cmaes")
PRUNERS = ("median", "none")
SPLITS = ("validation", "test")  # what a trial is scored on: the clients' validation splits, or the test split
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
CONFIG_ATTR = "config_toml"  # the trial's full config (run paths stripped), as TOML
MAX_FAILURES_IN_A_ROW = 3

PRIVACY_NOTE = (
    "privacy: tuning is a use of the data. Every trial trains on the clients' records and is "
    "scored on held-out records, and picking the best trial leaks information about them that "
    "no single run's epsilon covers. Tune on a public or synthetic proxy of the data where you "
    "can; with DP on private data, pass --state-dir so every trial's training is charged to "
    "the clients' lifetime ledgers and the ledgers stay true.")


class TuneError(ValueError):
    """A problem with the study or its options; the message says which."""


@dataclass(frozen=True)
class Objective:
    """What a trial maximises: `accuracy`, `macro_f1` or `recall:LABEL`."""

    metric: str
    label: str = ""

    @classmethod
    def parse(cls, text: str) -> "Objective":
        metric, colon, label = text.partition(":")
        if metric in ("accuracy", "macro_f1") and not colon:
            return cls(metric)
        if metric == "recall" and label:
            return cls(metric, label)
        raise TuneError(f"--objective: got {text!r}, expected accuracy, macro_f1 or recall:LABEL")

    @property
    def name(self) -> str:
        return f"recall:{self.label}" if self.label else self.metric

    def value(self, record: dict, split: str = "validation") -> float:
        """The objective in one round's record of metrics.json, on `split`."""
        key = keys.FEDERATED_EVAL if split == "validation" else keys.EVAL
        evaluation = record.get(key)
        if not evaluation:
            raise TuneError(f"round {record.get(keys.ROUND)}: no {split} evaluation in metrics.json "
                            f"({key!r} is missing: every client's evaluation failed or was rejected); "
                            "the trial's log names the cause")
        if not self.label:
            return float(evaluation[self.metric])
        per_class = evaluation.get(keys.PER_CLASS, {})
        if self.label not in per_class:
            raise TuneError(f"--objective {self.name}: no class {self.label!r} in the evaluation; "
                            f"classes: {', '.join(per_class)}")
        return float(per_class[self.label]["recall"])


@dataclass(frozen=True)
class TuneOptions:
    trials: int
    sampler: str = "tpe"
    storage: str = ""  # an Optuna storage URL; "" -> sqlite:///OUT/study.db
    study_name: str = "fedcl"
    objective: str = "accuracy"
    multi_objective: bool = False
    pruner: str = "median"
    seed: int = 0
    state_dir: str = ""  # the clients' ledgers, charged by every DP trial
    split: str = "validation"  # what a trial is scored on (SPLITS)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise TuneError(f"--trials: got {self.trials}, expected a positive integer")
        if self.sampler not in SAMPLERS:
            raise TuneError(f"--sampler: got {self.sampler!r}, expected one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise TuneError(f"--pruner: got {self.pruner!r}, expected one of {', '.join(PRUNERS)}")
        if self.multi_objective and self.sampler == "cmaes":
            raise TuneError("--sampler cmaes handles one objective; use tpe or random with "
                            "--multi-objective")
        if self.split not in SPLITS:
            raise TuneError(f"--split: got {self.split!r}, expected one of {', '.join(SPLITS)}")
        if self.split == "validation" and Objective.parse(self.objective).label:
            raise TuneError(f"--objective {self.objective}: the clients' validation reports carry "
                            "accuracy and macro_f1, not per-class recall; use one of those, or "
                            "--split test to score trials on the test split")


def storage_url(options: TuneOptions, out: Path) -> str:
    url = options.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return url


def open_storage(url: str) -> optuna.storages.BaseStorage:
    # Heartbeats let a later run mark the trial of a killed process FAIL.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=15, grace_period=60)


def make_sampler(name: str, space: SearchSpace, seed: int, trials: int = 40) -> optuna.samplers.BaseSampler:
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise TuneError("--sampler cmaes needs the cmaes package: pip install cmaes") from None
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    # TPE draws its first n_startup_trials at random (Optuna's default: 10); with a
    # budget of a few dozen trials or less that would make it a random search, so it
    # models the space after a third of the budget (at least 3 trials, at most 10).
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, min(10, trials // 3)))


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    # Three finished trials before any pruning: a median of fewer is noise.
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def open_study(options: TuneOptions, space: SearchSpace, out: Path,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create the study or load it to continue; refuse one made for another objective."""
    directions = ["maximize", "minimize"] if options.multi_objective else ["maximize"]
    storage = open_storage(storage_url(options, out))
    study = optuna.create_study(storage=storage, study_name=options.study_name, directions=directions,
                                pruner=pruner or make_pruner(options.pruner), load_if_exists=True)
    mode = {"objective": options.objective, "multi_objective": options.multi_objective, "split": options.split}
    for key, value in mode.items():
        stored = study.user_attrs.get(key)
        if stored is None and key == "split" and study.trials:
            # A study begun before trials had a split was scored on the test split: continuing it
            # on the validation split would rank two kinds of score against each other.
            stored = "test"
            study.set_user_attr(key, stored)
        if stored is None:
            study.set_user_attr(key, value)
        elif stored != value:
            raise TuneError(f"study {options.study_name!r} was run with {key} = {stored!r}, not "
                            f"{value!r}; use that, or another --study-name")
    # A fresh seed per session, so a resumed random/TPE search does not repeat its first points.
    study.sampler = make_sampler(options.sampler, space, options.seed + len(study.trials), options.trials)
    return study


def trial_epsilon(record: dict) -> float:
    """The most any client had spent in this trial's run by this round (0 when DP is off).
    Each reply's `run_epsilon` is that run's own cost: under a shared `--state-dir` the
    lifetime `epsilon` also holds every earlier trial's. Replies from before it existed
    carry the lifetime figure only."""
    clients = record.get(keys.CLIENTS, [])
    field = "run_epsilon" if any(c.get("run_epsilon") is not None for c in clients) else "epsilon"
    spent = [c[field] for c in clients if c.get(field) is not None]
    return float(max(spent)) if spent else 0.0


def clean_toml(config: Config, header: str = "") -> str:
    """A config `fedcl simulate --config` takes as is: no paths into trial folders."""
    text = config.replace({"run.out_dir": "", "run.state_dir": ""}, source="tune").to_toml()
    return "".join(f"# {line}\n" for line in header.splitlines()) + text


Runner = Callable[[Config], None]


def run_rounds(config: Config, runner: Runner, on_round: Callable[[dict], None], *,
               step: bool) -> dict:
    """Run the trial's federation; call `on_round(record)` per committed round (it
    may raise `optuna.TrialPruned`); return the last round's record."""
    run_dir = RunDir(config.run.out_dir)
    rounds = config.federation.rounds
    seen = 0
    for target in (range(1, rounds + 1) if step else [rounds]):
        runner(config.replace({"federation.rounds": target}, source="tune") if step else config)
        done = run_dir.completed_rounds()
        if done < target:
            raise RuntimeError(f"{run_dir.path}: the run stopped after round {done} of {target}")
        records = run_dir.metrics()[keys.ROUNDS]
        for record in records[seen:]:
            on_round(record)
        seen = len(records)
    return run_dir.metrics()[keys.ROUNDS][-1]


def make_objective(base: Config, space: SearchSpace, out: Path, options: TuneOptions,
                   runner: Runner, *, grid: bool, prune: bool) -> Callable:
    objective = Objective.parse(options.objective)

    def run_trial(trial: optuna.Trial):
        values = space.suggest(trial, grid=grid)
        config = base.replace(values, source=f"trial {trial.number}")
        folder = (out / "trials" / f"trial-{trial.number}").resolve()
        if folder.exists() and any(folder.iterdir()):
            raise TuneError(f"{folder}: exists already (another study in the same --out?)")
        config = config.replace({"run.out_dir": str(folder), "run.state_dir": options.state_dir},
                                source="tune")
        trial.set_user_attr(CONFIG_ATTR, clean_toml(config))
        trial.set_user_attr("run_dir", str(folder))
        step = prune and config.federation.rounds > 1 and not (
            config.privacy.enabled and config.privacy.target_epsilon > 0)
        print(f"trial {trial.number} | " + " | ".join(f"{k} {v}" for k, v in values.items()), flush=True)

        def on_round(record: dict) -> None:
            value = objective.value(record, options.split)
            if not options.multi_objective:
                trial.report(value, record[keys.ROUND])
                if step and trial.should_prune():
                    print(f"trial {trial.number} | round {record[keys.ROUND]} | {objective.name} "
                          f"{value:.4f} | pruned", flush=True)
                    raise optuna.TrialPruned(f"round {record[keys.ROUND]}: {objective.name} {value:.4f}")

        last = run_rounds(config, runner, on_round, step=step)
        value, epsilon = objective.value(last, options.split), trial_epsilon(last)
        trial.set_user_attr("epsilon", epsilon)
        print(f"trial {trial.number} | done | {objective.name} {value:.4f} | eps {epsilon:.2f}", flush=True)
        return (value, epsilon) if options.multi_objective else value

    return run_trial


def write_best(study: optuna.Study, out: Path, number: int | None = None) -> Path:
    """Write a trial's config (default: the best one) to OUT/best.toml."""
    if number is None:
        trial = study.best_trial
    else:
        matches = [t for t in study.trials if t.number == number]
        if not matches or matches[0].state != optuna.trial.TrialState.COMPLETE:
            done = [t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            raise TuneError(f"--pick {number}: no completed trial {number}; completed: {done}")
        trial = matches[0]
    names = [study.user_attrs.get("objective", "value"), "epsilon"]
    values = ", ".join(f"{name} {v:.6g}" for name, v in zip(names, trial.values))
    header = (f"fedcl tune: study {study.study_name!r}, trial {trial.number}: {values}\n"
              f"run it with: fedcl simulate --config {out / 'best.toml'}")
    text = trial.user_attrs[CONFIG_ATTR]
    path = out / "best.toml"
    write_text(path, "".join(f"# {line}\n" for line in header.splitlines()) + text)
    return path


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_study(base: Config, space: SearchSpace, out: Path, options: TuneOptions, *,
              runner: Runner | None = None, pruner: optuna.pruners.BasePruner | None = None,
              ) -> optuna.Study:
    """Run trials until the study holds `options.trials` finished ones."""
    if runner is None:  # Flower's engine, with Ray kept up between trials
        from fedcl.federation.engine import shared_ray
        from fedcl.ops.run import simulate

        with shared_ray():
            return run_study(base, space, out, options, runner=simulate, pruner=pruner)
    Objective.parse(options.objective)
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(options, space, out, pruner)
    grid = options.sampler == "grid"
    target = options.trials
    if grid:
        size = math.prod(len(v) for v in space.grid().values())
        if target > size:
            print(f"tune: the grid has {size} points; running those, not {target} trials")
            target = size
    prune = options.pruner != "none" and not options.multi_objective
    objective = make_objective(base, space, out, options, runner, grid=grid, prune=prune)
    failures = 0
    while finished_trials(study) < target:
        print(f"tune: study {options.study_name!r} | {finished_trials(study)} of {target} trials finished",
              flush=True)
        ran: list = []  # this worker's trial (others may share the study)
        study.optimize(objective, n_trials=1, catch=(Exception,),
                       callbacks=[lambda _study, trial: ran.append(trial)])
        last = ran[-1]
        if last.state == optuna.trial.TrialState.FAIL:
            failures += 1
            if failures >= MAX_FAILURES_IN_A_ROW:
                raise RuntimeError(f"{failures} trials in a row failed (see the log above); "
                                   "the study is kept, fix the cause and run again")
        else:
            failures = 0
            if not options.multi_objective and last.state == optuna.trial.TrialState.COMPLETE:
                write_best(study, out)
    return study


def check_objective(base: Config, objective: Objective, split: str = "validation") -> None:
    """The objective must exist for the task (and `recall:LABEL` name a class), and the split
    it is scored on must exist, before any trial."""
    if base.data.task != "classification":
        raise ConfigError(f"--objective {objective.name}: data.task = {base.data.task!r} reports "
                          "loss and perplexity only; fedcl tune needs a classification task")
    if split == "validation" and base.data.eval_fraction <= 0:
        raise ConfigError("data.eval_fraction = 0: the clients hold no validation split to score trials "
                          "on; set data.eval_fraction (e.g. 0.1) or pass --split test")
    if not objective.label:
        return
    from fedcl.session import GlobalEvaluator

    labels = list(GlobalEvaluator(base).shared.dataset.labels)
    if objective.label not in labels:
        raise ConfigError(f"--objective {objective.name}: no class {objective.label!r}; "
                          f"classes: {', '.join(labels)}")
