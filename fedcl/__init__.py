"""fedcl: federated and continual LoRA fine-tuning of DeepSeek-family models on Flower."""

import os as _os

# fedcl never reaches a model hub or a telemetry endpoint at run time. These
# are read when the libraries are imported, so they are set here, before any
# fedcl module imports them; a user's own setting still wins.
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                     ("FLWR_TELEMETRY_ENABLED", "0"), ("TOKENIZERS_PARALLELISM", "false")):
    _os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
