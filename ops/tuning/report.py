"""What a study found: a table of the best trials, the Pareto front, and plots.

`print_best` and `print_front` print plain tables; `write_plots` draws the
optimisation history, the Pareto front (two objectives) and the parameter
importances as PNG files with matplotlib. Importances need scikit-learn
(Optuna's fANOVA uses its trees); without it that plot is skipped with a note.
"""

from __future__ import annotations

from pathlib import Path

import optuna

COMPLETE = optuna.trial.TrialState.COMPLETE


def _objective(study: optuna.Study) -> str:
    split = study.user_attrs.get("split")  # studies made before --split scored the test split
    return f"{study.user_attrs.get('objective', 'value')} ({split or 'test'})"


def _params(trial: optuna.trial.FrozenTrial) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in trial.params.items())


def states(study: optuna.Study) -> str:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no trials"


def print_best(study: optuna.Study, top: int = 10) -> None:
    """The `top` completed trials by value, best first."""
    done = sorted(study.get_trials(deepcopy=False, states=(COMPLETE,)), key=lambda t: -t.value)
    print(f"study {study.study_name!r}: {states(study)}")
    print(f"{'trial':>5}  {_objective(study):>12}  {'epsilon':>8}  params")
    for trial in done[:top]:
        print(f"{trial.number:>5}  {trial.value:>12.4f}  {trial.user_attrs.get('epsilon', 0.0):>8.2f}"
              f"  {_params(trial)}")


def print_front(study: optuna.Study) -> None:
    """The Pareto front of (utility up, epsilon down), by epsilon."""
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    print(f"study {study.study_name!r}: {states(study)}; Pareto front ({len(front)} trials):")
    print(f"{'trial':>5}  {_objective(study):>12}  {'epsilon':>8}  params")
    for trial in front:
        print(f"{trial.number:>5}  {trial.values[0]:>12.4f}  {trial.values[1]:>8.2f}  {_params(trial)}")
    print("pick one: fedcl tune --report --pick TRIAL (same --storage/--study-name/--out) "
          "writes its config to OUT/best.toml")


def print_report(study: optuna.Study) -> None:
    if len(study.directions) > 1:
        print_front(study)
    else:
        print_best(study)


def _history(study: optuna.Study, path: Path, plt) -> None:
    done = study.get_trials(deepcopy=False, states=(COMPLETE,))
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [t.number for t in done]
    ys = [t.values[0] for t in done]
    ax.scatter(xs, ys, label="trial", color="tab:blue")
    best, running = [], float("-inf")
    for y in ys:
        running = max(running, y)
        best.append(running)
    ax.step(xs, best, where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel=_objective(study), title=f"optimisation history: {study.study_name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _front(study: optuna.Study, path: Path, plt) -> None:
    done = study.get_trials(deepcopy=False, states=(COMPLETE,))
    front = {t.number for t in study.best_trials}
    fig, ax = plt.subplots(figsize=(6, 4))
    for trial in done:
        on_front = trial.number in front
        ax.scatter(trial.values[1], trial.values[0], color="tab:red" if on_front else "tab:gray")
        ax.annotate(str(trial.number), (trial.values[1], trial.values[0]), fontsize=8)
    ax.set(xlabel="epsilon spent (max over clients)", ylabel=_objective(study),
           title="Pareto front (red): more utility, less epsilon")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _importances(study: optuna.Study, path: Path, plt) -> str | None:
    """Draw importances; return why they were skipped, if they were."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return "parameter importances skipped: they need scikit-learn (pip install scikit-learn)"
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    try:
        importances = optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError) as err:
        return f"parameter importances skipped: {err}"
    if not importances:
        return "parameter importances skipped: need two completed trials with different values"
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.4 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel=f"importance for {_objective(study)} (fANOVA)", title="parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Draw the study's plots into `out`; print a note for any that is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not study.get_trials(deepcopy=False, states=(COMPLETE,)):
        print("plots skipped: no completed trials yet")
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "history.png"]
    _history(study, written[0], plt)
    if len(study.directions) > 1:
        written.append(out / "pareto.png")
        _front(study, written[-1], plt)
    skipped = _importances(study, out / "importances.png", plt)
    if skipped:
        print(skipped)
    else:
        written.append(out / "importances.png")
    return written
