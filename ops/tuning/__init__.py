"""Hyperparameter search for fedcl: `fedcl tune` (Optuna; every trial a federated run).

`space` parses and checks the search space, `study` runs trials and keeps the
study in a database, `report` prints and draws what a study found, `cli` is
the command.
"""

from fedcl.ops.tuning.space import SearchSpace, SpaceError, load_space, parse_space
from fedcl.ops.tuning.study import Objective, TuneError, TuneOptions, run_study, write_best

__all__ = ["Objective", "SearchSpace", "SpaceError", "TuneError", "TuneOptions", "load_space",
           "parse_space", "run_study", "write_best"]
