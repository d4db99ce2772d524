"""Sample-level differential privacy for fedcl: DP-SGD, accounting, a lifetime ledger.

- `plan_for` fixes a client's noise (calibrated once to the whole planned
  schedule) and checks the settings against its data;
- `train_private` runs one round of DP-SGD with Opacus on the LoRA parameters;
- `PrivacyLedger` is the node's lifetime record of what its data has paid;
- `ClientPrivacy` joins them for a ClientApp: budget check, then charge.

Nothing here imports Flower.
"""

from fedcl.privacy.accounting import DPPlan, calibrate_noise, client_level_plan, epsilon, plan_for, sample_plan
from fedcl.privacy.client import ClientPrivacy, Verdict, client_privacy, state_dir_for
from fedcl.privacy.ledger import LEDGER_FILE, LedgerError, PrivacyLedger

__all__ = ["DPPlan", "calibrate_noise", "epsilon", "plan_for", "sample_plan", "client_level_plan",
           "ClientPrivacy", "Verdict", "client_privacy", "state_dir_for",
           "LEDGER_FILE", "LedgerError", "PrivacyLedger", "train_private"]


def __getattr__(name):
    # dpsgd imports torch and fedcl.train; load it only when training.
    if name == "train_private":
        from fedcl.privacy.dpsgd import train_private
        return train_private
    raise AttributeError(name)
