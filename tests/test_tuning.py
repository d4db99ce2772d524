"""`fedcl tune`: search spaces, studies for every sampler, resume, pruning, best.toml.

Trials run in-process (the real ServerApp and ClientApp, no Ray) except one
smoke test of the command on Flower's engine. Resume and pruning use a fake
runner that writes real run folders with chosen metrics, so they are exact.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from fedcl.client.app import app as client_app
from fedcl.config import load_config
from fedcl.ops.tuning import SpaceError, TuneOptions, parse_space, run_study
from fedcl.server.app import main as server_main
from fedcl.rundir import RunDir
from fedcl.federation.grid import InProcessGrid, server_context

pytestmark = pytest.mark.tuning
optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY = ["model.name=tiny-llama", "data.max_records=40", "data.max_test_records=16",
        "federation.clients=2", "federation.rounds=1", "train.local_steps=1", "train.batch_size=4"]
LR = {"train": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}


@pytest.fixture(scope="module")
def base():
    return load_config(None, TINY)


def inprocess(config):
    """Run a trial through the real apps in this process, as the engine would."""
    flat = config.to_flat()
    server_main(InProcessGrid(client_app, config.federation.clients, flat), server_context(flat))


# -- the search space --------------------------------------------------------------------
GOOD = [
    (LR, {"train.lr": ("float", True)}),
    ({"train.lr": {"low": 1e-3, "high": 2e-3, "step": 5e-4}}, {"train.lr": ("float", False)}),
    ({"lora": {"r": {"low": 2, "high": 8, "step": 2}}}, {"lora.r": ("int", False)}),
    ({"lora.r": {"choices": [4, 8]}, "strategy.name": {"choices": ["fedavg", "fedprox"]}},
     {"lora.r": ("choice", False), "strategy.name": ("choice", False)}),
    ({"train.weight_decay": {"choices": [0, 0.01]}}, {"train.weight_decay": ("choice", False)}),
]


@pytest.mark.parametrize("table, expected", GOOD)
def test_good_spaces_parse(base, table, expected):
    space = parse_space(table, base)
    assert {p.key: (p.kind, p.log) for p in space.params} == expected


BAD = [  # (space, words the message must contain)
    ({"train.learning_rate": {"low": 0.1, "high": 0.2}}, ["train.learning_rate", "unknown key"]),
    ({"optimizer.lr": {"low": 0.1, "high": 0.2}}, ["optimizer.lr", "unknown key"]),
    ({"run.out_dir": {"choices": ["a"]}}, ["run.out_dir"]),
    ({"train.lr": {"low": 0.01, "high": 0.01}}, ["train.lr", "empty range"]),
    ({"train.lr": {"low": 0.1, "high": 0.01}}, ["train.lr", "above high"]),
    ({"train.weight_decay": {"low": 0.0, "high": 0.1, "log": True}}, ["train.weight_decay", "log"]),
    ({"lora.r": {"choices": ["8", "16"]}}, ["lora.r", "wrong type", "integer"]),
    ({"strategy.name": {"choices": ["fedavg", "fedsgd"]}}, ["strategy.name", "fedsgd"]),
    ({"lora.dropout": {"low": 0.0, "high": 1.0}}, ["lora.dropout", "high"]),
    ({"lora.r": {"low": 2.5, "high": 8}}, ["lora.r", "low"]),
    ({"strategy.name": {"low": 1, "high": 2}}, ["strategy.name", "choices"]),
    ({"lora.r": {"choices": []}}, ["lora.r", "non-empty"]),
    ({"train.lr": {"low": 1e-3, "high": 1e-2, "step": 1e-3, "log": True}}, ["train.lr", "step"]),
    ({"train.lr": {"low": 1e-3}}, ["train.lr", "high"]),
    ({"train.lr": {"lo": 1e-3, "high": 1e-2}}, ["train.lr", "lo"]),
    ({}, ["no keys"]),
]


@pytest.mark.parametrize("table, words", BAD)
def test_bad_spaces_name_the_key(base, table, words):
    with pytest.raises(SpaceError) as err:
        parse_space(table, base)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_grid_needs_discrete_values(base):
    with pytest.raises(SpaceError, match="train.lr.*step"):
        parse_space(LR, base).grid()
    grid = parse_space({"train.lr": {"low": 1e-3, "high": 3e-3, "step": 1e-3},
                        "lora.r": {"choices": [4, 8]}}, base).grid()
    assert grid == {"train.lr": [1e-3, 2e-3, 3e-3], "lora.r": [4, 8]}


@pytest.mark.parametrize("text, ok", [("accuracy", True), ("macro_f1", True), ("recall:Acne", True),
                                      ("f1", False), ("recall", False), ("accuracy:Acne", False)])
def test_objective_names(text, ok):
    from fedcl.ops.tuning import Objective, TuneError

    if ok:
        assert Objective.parse(text).name == text
    else:
        with pytest.raises(TuneError, match="accuracy, macro_f1 or recall:LABEL"):
            Objective.parse(text)


def test_recall_objective_must_name_a_class(base):
    from fedcl.config import ConfigError
    from fedcl.ops.tuning import Objective
    from fedcl.ops.tuning.study import check_objective

    check_objective(base, Objective.parse("recall:Acne"))
    with pytest.raises(ConfigError, match="no class 'Nope'.*Acne"):
        check_objective(base, Objective.parse("recall:Nope"))


# -- studies ------------------------------------------------------------------------------
SAMPLER_SPACES = {
    "grid": {"train.lr": {"choices": [1e-3, 1e-2]}},
    "random": LR, "tpe": LR, "cmaes": LR,
}


@pytest.mark.parametrize("sampler", list(SAMPLER_SPACES))
def test_a_tiny_study_per_sampler(tmp_path, base, sampler):
    space = parse_space(SAMPLER_SPACES[sampler], base)
    study = run_study(base, space, tmp_path, TuneOptions(trials=2, sampler=sampler), runner=inprocess)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 2
    for trial in done:
        assert 1e-4 <= trial.params["train.lr"] <= 1e-2
        metrics = RunDir(tmp_path / "trials" / f"trial-{trial.number}").metrics()
        # scored on the clients' validation splits, not on the test split
        assert trial.value == metrics["rounds"][-1]["federated_eval"]["accuracy"]
    if sampler == "grid":
        assert sorted(t.params["train.lr"] for t in done) == [1e-3, 1e-2]
    best = load_config(tmp_path / "best.toml")
    assert best.train.lr == study.best_trial.params["train.lr"]
    assert best.run.out_dir == "" and best.run.state_dir == ""


def test_best_toml_reproduces_the_best_trial(tmp_path, base):
    space = parse_space({"train.lr": {"choices": [1e-4, 3e-2]}, "train.seed": {"choices": [0, 1]}}, base)
    study = run_study(base, space, tmp_path / "study", TuneOptions(trials=2, sampler="random", seed=3),
                      runner=inprocess)
    best = study.best_trial
    config = load_config(tmp_path / "study" / "best.toml", [f"run.out_dir={tmp_path / 'again'}"])
    inprocess(config)
    again = RunDir(tmp_path / "again").metrics()["rounds"][-1]
    first = RunDir(tmp_path / "study" / "trials" / f"trial-{best.number}").metrics()["rounds"][-1]
    assert again["federated_eval"]["accuracy"] == best.value
    assert again["eval"]["loss"] == pytest.approx(first["eval"]["loss"], rel=1e-6)


# -- resume and pruning, with a fake runner that writes real run folders ------------------
class FakeRunner:
    """Commits rounds with accuracies from `curves[trial number]`; may fail on chosen calls."""

    def __init__(self, curves, fail=None):
        self.curves, self.fail, self.calls = curves, fail or {}, []

    def __call__(self, config):
        number = int(Path(config.run.out_dir).name.removeprefix("trial-"))
        self.calls.append((number, config.federation.rounds))
        if number in self.fail:
            raise self.fail[number]("injected failure")
        run = RunDir(config.run.out_dir)
        metrics = run.start(config.to_toml(), {})
        for r in range(run.completed_rounds() + 1, config.federation.rounds + 1):
            eps = 0.5 * r * (1 + number)
            metrics["rounds"].append({"round": r, "clients": [{"id": 0, "epsilon": eps}],
                                      "federated_eval": {"accuracy": self.curves[number][r - 1], "macro_f1": 0.0},
                                      "eval": {"accuracy": 1.0 - self.curves[number][r - 1], "macro_f1": 0.0}})
            run.commit_round(metrics, r, {})


def test_interrupted_trials_fail_and_a_rerun_adds_to_the_study(tmp_path, base):
    space = parse_space(LR, base)
    storage = f"sqlite:///{tmp_path / 'db' / 'study.db'}"
    runner = FakeRunner({n: [0.1 * n] for n in range(8)}, fail={0: RuntimeError, 2: KeyboardInterrupt})
    options = TuneOptions(trials=2, sampler="random", storage=storage, pruner="none")
    with pytest.raises(KeyboardInterrupt):
        run_study(base, space, tmp_path, options, runner=runner)
    # trial 0 raised (FAIL, study went on), trial 1 completed, trial 2 was interrupted (FAIL)
    study = optuna.load_study(study_name="fedcl", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "FAIL"]
    run_study(base, space, tmp_path, options, runner=runner)  # same --trials 2: one more
    run_study(base, space, tmp_path, options, runner=runner)  # already there: nothing runs
    study = optuna.load_study(study_name="fedcl", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    run_study(base, space, tmp_path, TuneOptions(**{**options.__dict__, "trials": 4}), runner=runner)
    study = optuna.load_study(study_name="fedcl", storage=storage)
    assert [t.number for t in study.trials if t.state.name == "COMPLETE"] == [1, 3, 4, 5]
    assert [n for n, _ in runner.calls] == [0, 1, 2, 3, 4, 5]
    assert load_config(tmp_path / "best.toml").train.lr == study.best_trial.params["train.lr"]


def test_the_median_pruner_stops_a_poor_trial_after_its_first_round(tmp_path, base):
    three = base.replace({"federation.rounds": 3})
    runner = FakeRunner({0: [0.6, 0.7, 0.8], 1: [0.1, 0.9, 0.9], 2: [0.7, 0.8, 0.9]})
    study = run_study(three, parse_space(LR, base), tmp_path, TuneOptions(trials=3, sampler="random"),
                      runner=runner, pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert study.trials[1].intermediate_values == {1: 0.1}
    # round by round through the run folder's resume; the pruned trial ran one round only
    assert runner.calls == [(0, 1), (0, 2), (0, 3), (1, 1), (2, 1), (2, 2), (2, 3)]
    assert RunDir(tmp_path / "trials" / "trial-2").metrics()["rounds"][-1]["round"] == 3


def test_trials_are_scored_on_the_split_asked_for(tmp_path, base):
    from fedcl.config import ConfigError
    from fedcl.ops.tuning import Objective, TuneError
    from fedcl.ops.tuning.study import check_objective

    runner = FakeRunner({0: [0.3], 1: [0.8]})  # the test split's accuracy is 1 - the validation's
    options = TuneOptions(trials=2, sampler="random", pruner="none")
    validation = run_study(base, parse_space(LR, base), tmp_path / "v", options, runner=runner)
    assert [t.value for t in validation.trials] == [0.3, 0.8] and validation.best_trial.number == 1
    test = run_study(base, parse_space(LR, base), tmp_path / "t",
                     TuneOptions(**{**options.__dict__, "split": "test"}), runner=FakeRunner({0: [0.3], 1: [0.8]}))
    assert [t.value for t in test.trials] == pytest.approx([0.7, 0.2]) and test.best_trial.number == 0
    with pytest.raises(TuneError, match="was run with split = 'validation'"):
        run_study(base, parse_space(LR, base), tmp_path / "v", TuneOptions(**{**options.__dict__, "split": "test",
                                                                               "trials": 3}), runner=runner)
    with pytest.raises(TuneError, match="--split: got 'train'"):
        TuneOptions(trials=1, split="train")
    with pytest.raises(TuneError, match="recall.*--split test"):
        TuneOptions(trials=1, objective="recall:Acne")
    with pytest.raises(ConfigError, match="data.eval_fraction = 0.*--split test"):
        check_objective(base.replace({"data.eval_fraction": 0.0}), Objective.parse("accuracy"))
    check_objective(base.replace({"data.eval_fraction": 0.0}), Objective.parse("accuracy"), "test")


def test_a_study_from_before_splits_continues_on_the_test_split_only(tmp_path, base):
    import optuna

    from fedcl.ops.tuning import TuneError

    options = TuneOptions(trials=1, sampler="random", pruner="none", split="test")
    run_study(base, parse_space(LR, base), tmp_path, options, runner=FakeRunner({0: [0.3]}))
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    old = optuna.load_study(study_name=options.study_name, storage=storage)
    storage.set_study_user_attr(old._study_id, "split", None)  # as a study written before --split kept none
    with pytest.raises(TuneError, match="was run with split = 'test', not 'validation'"):
        run_study(base, parse_space(LR, base), tmp_path, TuneOptions(**{**options.__dict__, "split": "validation",
                                                                       "trials": 2}), runner=FakeRunner({1: [0.5]}))
    study = run_study(base, parse_space(LR, base), tmp_path, TuneOptions(**{**options.__dict__, "trials": 2}),
                      runner=FakeRunner({1: [0.5]}))
    assert len(study.trials) == 2 and study.user_attrs["split"] == "test"


def test_a_round_without_a_validation_report_fails_the_trial_with_its_cause(tmp_path, base):
    from fedcl.ops.tuning import Objective, TuneError

    with pytest.raises(TuneError, match="round 2: no validation evaluation.*federated_eval"):
        Objective.parse("accuracy").value({"round": 2, "eval": {"accuracy": 0.5}})


def test_a_trials_epsilon_is_what_its_own_run_spent():
    from fedcl.ops.tuning.study import trial_epsilon

    # Under a shared --state-dir the lifetime figure holds every earlier trial too.
    shared = {"clients": [{"id": 0, "epsilon": 9.0, "run_epsilon": 2.0}, {"id": 1, "epsilon": 7.5, "run_epsilon": 3.0}]}
    assert trial_epsilon(shared) == 3.0
    assert trial_epsilon({"clients": [{"id": 0, "epsilon": 9.0}]}) == 9.0  # replies from before run_epsilon
    assert trial_epsilon({"clients": [{"id": 0}]}) == 0.0  # DP off


def test_multi_objective_front_and_pick(tmp_path, base, capsys):
    from fedcl.ops.tuning.report import print_report
    from fedcl.ops.tuning.study import write_best

    runner = FakeRunner({0: [0.5], 1: [0.9], 2: [0.4]})  # epsilon grows with the trial number
    study = run_study(base, parse_space(LR, base), tmp_path,
                      TuneOptions(trials=3, sampler="random", multi_objective=True), runner=runner)
    assert sorted(t.number for t in study.best_trials) == [0, 1]  # trial 2: worse and dearer
    print_report(study)
    assert "Pareto front (2 trials)" in capsys.readouterr().out
    assert not (tmp_path / "best.toml").exists()
    write_best(study, tmp_path, 1)
    assert load_config(tmp_path / "best.toml").train.lr == study.trials[1].params["train.lr"]


# -- the command, on Flower's engine -------------------------------------------------------
FEDCL = str(Path(sys.executable).with_name("fedcl"))


@pytest.mark.engine
def test_tune_command_on_the_real_engine(tmp_path):
    (tmp_path / "base.toml").write_text(load_config(None, TINY).to_toml())
    (tmp_path / "space.toml").write_text("[train.lr]\nlow = 1e-4\nhigh = 1e-2\nlog = true\n")
    out = tmp_path / "study"
    tune = [FEDCL, "tune", "--config", str(tmp_path / "base.toml"), "--space", str(tmp_path / "space.toml"),
            "--sampler", "tpe", "--storage", f"sqlite:///{out / 'study.db'}", "--out", str(out)]
    first = subprocess.run([*tune, "--trials", "1"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "tuning is a use of the data" in first.stdout
    assert (out / "trials" / "trial-0" / "checkpoint.json").is_file()
    best = load_config(out / "best.toml")
    assert best.model.name == "tiny-llama" and best.run.out_dir == ""
    again = subprocess.run([*tune, "--trials", "1"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "1 complete" in again.stdout  # nothing more to run
    assert not (out / "trials" / "trial-1").exists()
    bad = subprocess.run([*tune, "--trials", "1", "--sampler", "grid"], capture_output=True, text=True)
    assert bad.returncode == 2 and "train.lr" in bad.stderr and "step" in bad.stderr
