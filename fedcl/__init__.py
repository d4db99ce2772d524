"""fedcl: federated and continual LoRA fine-tuning of DeepSeek-family models on Flower.

One import namespace over the repository's folders (pyproject's package-dir):
this folder is the plain-PyTorch kernel (`fedcl.config`, `fedcl.data`, ...);
continual/ is `fedcl.continual`, federation/ `fedcl.federation`, strategies/
`fedcl.strategies`, client/ `fedcl.client`, server/ `fedcl.server` and ops/
`fedcl.ops`. In the checkout, fedcl/server etc. are symbolic links to those
folders, so the tree Python and import-linter see is the installed one. The
layers and what each may import are in the README and are checked by
import-linter (`.importlinter`).
"""

import os as _os
from pkgutil import extend_path as _extend_path

# A Flower app bundle holds its own copy of this folder, found first on
# sys.path when the SuperLink loads the apps; the installed fedcl's other
# folders (fedcl/server, ...) are then reached through this extended path.
__path__ = _extend_path(__path__, __name__)

# fedcl never reaches a model hub or a telemetry endpoint at run time. These
# are read when the libraries are imported, so they are set here, before any
# fedcl module imports them; a user's own setting still wins.
for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                     ("FLWR_TELEMETRY_ENABLED", "0"), ("TOKENIZERS_PARALLELISM", "false")):
    _os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
