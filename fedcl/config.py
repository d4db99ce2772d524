"""Typed configuration: one frozen dataclass per concern, validated at load.

A run's configuration comes from three layers, later ones winning:
the defaults below, a TOML file (``--config``), and ``--set section.key=value``
overrides (plus a few convenience flags such as ``--rounds``). Unknown keys and
bad values are errors that name the key, the value and what is allowed.

The same configuration travels to Flower apps as a flat ``run_config`` with
dotted keys (``lora.r = 8``): Flower only carries scalars, so list-valued
settings are comma-separated strings here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says which and why."""


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: got {value!r}, expected {allowed}")


def _check_finite(section: Any, name: str) -> None:
    """Every float setting of a section is a finite number (an inf weight decay or
    timeout would pass a range check and then make every update NaN or never end)."""
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}.{f.name}: got {value!r}, expected a finite number")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    _check(value in choices, key, value, "one of " + ", ".join(map(str, choices)))


def split_list(value: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c'] (empty string -> [])."""
    return [part.strip() for part in value.split(",") if part.strip()]


TaskKind = Literal["classification", "instruction"]
PartitionKind = Literal["iid", "dirichlet", "column"]
FrozenCache = Literal["memory", "file"]
ComputeDtype = Literal["float32", "bfloat16", "float16"]
TaskPeriod = Literal["year", "quarter", "month"]
MissingLabels = Literal["skip", "error"]


@dataclass(frozen=True)
class ModelConfig:
    # A built-in name (see `fedcl.models.BUILTIN_MODELS`), a local Hugging Face
    # folder, or a .gguf file. The default is the embedded SmolLM2-135M, which
    # has DeepSeek-LLM's (Llama) architecture.
    name: str = "smollm2-135m"
    # Tokens per example after truncation; the cost of a step grows with it.
    max_length: int = 64
    # Where the base, the adapter, the batches and the evaluation live: "auto" (a
    # CUDA GPU when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N".
    # A deployed node's node config `device` overrides it for that node.
    device: str = "auto"
    # Matmul precision. On the CPU: bfloat16 autocast doubles raw matmul throughput
    # here, but a training step under it measured many times slower with this
    # torch build (see BENCHMARKS.md), so float32 is the default. On a GPU:
    # bfloat16 (or float16, trained with loss scaling, where bfloat16 is missing)
    # is the frozen base's weight dtype; LoRA and the optimiser stay float32
    # (`fedcl.accelerator`). float16 needs a GPU.
    compute_dtype: ComputeDtype = "float32"
    # Recompute each decoder layer's activations in the backward pass instead of
    # keeping them: less memory per example, one more forward pass per step;
    # the same gradients, also DP-SGD's per-sample ones.
    gradient_checkpointing: bool = False
    # Torch threads per client process (0: auto, at most federation.client_cpus and
    # a share of the cores that leaves one for the server; `fedcl.plan.thread_plan`).
    threads: int = 0
    # Keep only the first N transformer layers of the base (0: all): a smaller, faster
    # model from the same pretrained weights, for quick trials on small machines.
    layers: int = 0

    def __post_init__(self) -> None:
        _check_finite(self, "model")
        _check(bool(self.name), "model.name", self.name, "a model name or path")
        _check(8 <= self.max_length <= 8192, "model.max_length", self.max_length, "an integer in [8, 8192]")
        _check_choice("model.compute_dtype", self.compute_dtype, get_args(ComputeDtype))
        _check(self.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", self.device) is not None,
               "model.device", self.device, "auto, cpu, cuda or cuda:N")
        _check(self.threads >= 0, "model.threads", self.threads, "0 (auto) or a positive integer")
        _check(self.layers >= 0, "model.layers", self.layers, "0 (all) or a positive integer")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # "auto" picks the attention projections for the model's architecture
    # (`fedcl.models.LORA_TARGETS`); otherwise comma-separated module names.
    target_modules: str = "auto"
    # Seed of the adapter's initialisation: every node builds the same start.
    init_seed: int = 0
    # LoRA in the top k decoder layers only (0: all layers). Everything below is
    # frozen, so its output is computed once per record and kept in the node
    # (`fedcl.frozen`); a step then runs the top k layers alone, about
    # layers/k times cheaper. At most the model's layer count (after model.layers).
    top_layers: int = 0
    # Where those states are kept: "memory" (the process's life) or "file": also
    # in the node's state folder (`fedcl.frozen.CACHE_FILE`, never sent), so a
    # restarted node or a later run with the same settings does not rebuild them.
    frozen_cache: FrozenCache = "memory"

    def __post_init__(self) -> None:
        _check_finite(self, "lora")
        _check(1 <= self.r <= 1024, "lora.r", self.r, "an integer in [1, 1024]")
        _check(isinstance(self.top_layers, int) and not isinstance(self.top_layers, bool)
               and self.top_layers >= 0, "lora.top_layers", self.top_layers,
               "0 (all layers) or a positive integer, at most the model's layer count")
        _check_choice("lora.frozen_cache", self.frozen_cache, get_args(FrozenCache))
        _check(self.alpha > 0, "lora.alpha", self.alpha, "a positive integer")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "a float in [0, 1)")
        _check(
            self.target_modules == "auto" or bool(split_list(self.target_modules)),
            "lora.target_modules", self.target_modules, '"auto" or comma-separated module names',
        )


@dataclass(frozen=True)
class DataConfig:
    # A built-in demo ("drugreview", "drugreview-condition", "germancredit",
    # "lending-club", "headlines", "icd10-chapters", "cfpb-complaints") or ""
    # when `path` names the user's own file.
    dataset: str = "drugreview-condition"
    path: str = ""
    # Optional separate test file for the server's global evaluation;
    # otherwise `test_fraction` of the data is held out.
    test_path: str = ""
    task: TaskKind = "classification"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    # Comma-separated allowed labels; empty: the labels found in the data.
    labels: str = ""
    # The word the model scores for a label, "label:word" comma-separated, e.g.
    # "0:no, 1:yes": the verbalizer scores one token per class, so labels that are
    # codes, or share a first token, read better as words. Reports keep the labels.
    # Labels not named here are their own word; clashing first tokens are resolved
    # automatically (with a warning saying which token each label got).
    label_words: str = ""
    # Records whose label is a missing-value marker (empty, \N, NA, N/A, NaN,
    # NULL, JSON null, ...): "skip" them (counted in the log) or "error" (their lines).
    missing_labels: MissingLabels = "skip"
    # Prompt templates; {text} / {prompt} are filled from the record. "auto"
    # takes the built-in dataset's own prompt (or "{text}\nLabel:").
    classification_template: str = "auto"
    instruction_template: str = "### Instruction:\n{prompt}\n### Response:\n"
    # Classification: subtract from every label score the score the base model
    # gives the template with an empty text, so training starts with no label
    # preference instead of the base model's prior (on a small model often far
    # off: all of it on one label). It is computed from the base model alone,
    # so it reads no private data and costs no privacy.
    calibrate: bool = False
    partition: PartitionKind = "iid"
    alpha: float = 0.5
    partition_column: str = ""
    # Each client's held-out share, evaluated by the client itself.
    eval_fraction: float = 0.2
    test_fraction: float = 0.2
    # Cap on training records taken from the source (0: all); keeps demos short.
    max_records: int = 0
    max_test_records: int = 0
    # Continual learning, off while both are empty (one ordinary federation):
    # - task_column: a meta column holding each record's date; one task per period
    #   of it, oldest first (domain-incremental);
    # - task_groups: label groups, one task each, in order (class-incremental):
    #   "Acne,Pain; Depression,Insomnia" (";" between tasks, "," between labels);
    # - task_files: one JSONL/CSV file per task, in order, comma-separated (used
    #   instead of path/dataset); task_test_files pairs one test file with each,
    #   otherwise each file holds out test_fraction.
    task_column: str = ""
    task_period: TaskPeriod = "year"
    task_groups: str = ""
    task_files: str = ""
    task_test_files: str = ""

    def label_groups(self) -> list[list[str]]:
        return [[label.strip() for label in group.split(",") if label.strip()]
                for group in self.task_groups.split(";") if group.strip()]

    def task_file_list(self) -> list[str]:
        return split_list(self.task_files)

    def label_word_map(self) -> dict[str, str]:
        """{label: word} from `label_words` ("0:no, 1:yes"); a label may hold ':', a word may not."""
        pairs = [item.rpartition(":") for item in split_list(self.label_words)]
        return {label.strip(): word.strip() for label, _, word in pairs}

    def task_test_file_list(self) -> list[str]:
        return split_list(self.task_test_files)

    def _check_label_words(self) -> None:
        items = split_list(self.label_words)
        allowed = 'comma-separated label:word pairs, e.g. "0:no, 1:yes"'
        for item in items:
            label, colon, word = item.rpartition(":")
            _check(bool(colon and label.strip() and word.strip()), "data.label_words", item, allowed)
        words = self.label_word_map()
        _check(len(words) == len(items), "data.label_words", self.label_words, allowed + ", each label once")
        _check(len(set(words.values())) == len(words), "data.label_words", self.label_words,
               allowed + ", a different word for each label")

    def __post_init__(self) -> None:
        _check_finite(self, "data")
        _check(bool(self.dataset) or bool(self.path) or bool(self.task_files), "data.dataset", self.dataset,
               "a built-in dataset name, or data.path set to a JSONL/CSV file")
        if self.task_files or self.task_test_files:
            files, tests = self.task_file_list(), self.task_test_file_list()
            _check(len(files) >= 2, "data.task_files", self.task_files,
                   "at least two comma-separated JSONL/CSV files, one task each, oldest first")
            _check(not tests or len(tests) == len(files), "data.task_test_files", self.task_test_files,
                   f"empty, or one test file per task ({len(files)} files in data.task_files)")
            for key, value in (("data.path", self.path), ("data.test_path", self.test_path),
                               ("data.task_column", self.task_column), ("data.task_groups", self.task_groups)):
                _check(not value, key, value, "empty when data.task_files is set (the files are the stream)")
        _check_choice("data.task", self.task, get_args(TaskKind))
        _check_choice("data.missing_labels", self.missing_labels, get_args(MissingLabels))
        self._check_label_words()
        _check_choice("data.partition", self.partition, get_args(PartitionKind))
        _check(self.alpha > 0 and math.isfinite(self.alpha), "data.alpha", self.alpha, "a positive number")
        _check(self.partition != "column" or bool(self.partition_column), "data.partition_column",
               self.partition_column, "a column name when data.partition = \"column\"")
        _check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "a float in [0, 1)")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", self.test_fraction, "a float in (0, 1)")
        _check(self.max_records >= 0, "data.max_records", self.max_records, "0 or a positive integer")
        _check(self.max_test_records >= 0, "data.max_test_records", self.max_test_records, "0 or a positive integer")
        _check_choice("data.task_period", self.task_period, get_args(TaskPeriod))
        _check(not (self.task_column and self.task_groups), "data.task_groups", self.task_groups,
               "empty when data.task_column is set (a stream is cut one way)")
        if self.task_groups:
            groups = self.label_groups()
            labels = [label for group in groups for label in group]
            _check(len(groups) >= 2 and all(groups), "data.task_groups", self.task_groups,
                   'at least two non-empty label groups, e.g. "Acne,Pain; Depression"')
            _check(len(set(labels)) == len(labels), "data.task_groups", self.task_groups,
                   "each label in one group only")
        _check(not self.calibrate or self.task == "classification", "data.calibrate", self.calibrate,
               "false for data.task = \"instruction\" (it calibrates label scores)")
        key = "data.classification_template" if self.task == "classification" else "data.instruction_template"
        slot = "{text}" if self.task == "classification" else "{prompt}"
        template = self.classification_template if self.task == "classification" else self.instruction_template
        _check(template == "auto" or slot in template, key, template, f'"auto" or a template containing {slot}')


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-3
    # Optimiser steps per client per round, each on `batch_size` examples.
    local_steps: int = 6
    batch_size: int = 8
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # Binary tasks: the class that matters and the probability at which it is
    # predicted (e.g. flag high risk at 0.4 to raise its recall).
    positive_label: str = ""
    threshold: float = 0.5
    # Binary tasks with a positive_label: evaluations report the best recall of
    # that class at this precision, and the probability threshold that gives it.
    target_precision: float = 0.9
    # ...and the server holds out this share of its evaluation records (stratified)
    # as a validation split: the threshold that reaches target_precision there is
    # the one its test figures use and report, so no threshold is ever chosen on
    # the test split (0: the test split is scored at train.threshold).
    threshold_validation: float = 0.3
    eval_batch_size: int = 16
    # DP-SGD: the most examples one forward/backward pass holds (0: the whole
    # logical batch). A logical (Poisson) batch larger than this is processed in
    # micro-batches whose per-example gradients are clipped and summed, then
    # noised once per logical step: memory is bounded, privacy unchanged.
    micro_batch_size: int = 0

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        _check(self.lr > 0 and math.isfinite(self.lr), "train.lr", self.lr, "a positive number")
        _check(self.local_steps >= 1, "train.local_steps", self.local_steps, "a positive integer")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "a positive integer")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a non-negative number")
        _check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", self.label_smoothing, "a float in [0, 1)")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "0 (off) or a positive number")
        _check(0.0 < self.threshold < 1.0, "train.threshold", self.threshold, "a float in (0, 1)")
        _check(0.0 < self.target_precision <= 1.0, "train.target_precision", self.target_precision,
               "a float in (0, 1]")
        _check(0.0 <= self.threshold_validation < 1.0, "train.threshold_validation",
               self.threshold_validation, "a float in [0, 1)")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", self.eval_batch_size, "a positive integer")
        _check(self.micro_batch_size >= 0, "train.micro_batch_size", self.micro_batch_size,
               "0 (the whole logical batch at once) or a positive integer")


@dataclass(frozen=True)
class FederationConfig:
    clients: int = 3
    # Clients sampled per round (0: all).
    clients_per_round: int = 0
    rounds: int = 3
    # Minimum replies for a round to count, and how long to wait for them.
    min_replies: int = 1
    timeout: float = 3600.0
    # CPUs Flower's simulation engine gives each virtual client; 1 lets two
    # clients train at once on a 2-core machine.
    client_cpus: int = 1
    # The share of a GPU each virtual client holds when the run is on CUDA
    # (model.device): 1 trains one client per GPU at a time, 0.25 lets four share
    # one (each holds its own copy of the base). Ignored on the CPU.
    client_gpus: float = 1.0
    # Torch threads of the server's process (0: auto, the cores the clients that
    # train at once leave; `fedcl.plan.thread_plan`). It may evaluate while
    # clients train, and threads beyond the cores collapse under contention.
    server_threads: int = 0

    def __post_init__(self) -> None:
        _check_finite(self, "federation")
        _check(1 <= self.clients <= 10_000, "federation.clients", self.clients, "an integer in [1, 10000]")
        _check(0 <= self.clients_per_round <= self.clients, "federation.clients_per_round",
               self.clients_per_round, f"0 (all) or an integer in [1, federation.clients={self.clients}]")
        _check(1 <= self.rounds <= 100_000, "federation.rounds", self.rounds, "a positive integer")
        _check(self.min_replies >= 1, "federation.min_replies", self.min_replies, "a positive integer")
        _check(self.timeout > 0, "federation.timeout", self.timeout, "a positive number of seconds")
        _check(self.client_cpus >= 1, "federation.client_cpus", self.client_cpus, "a positive integer")
        _check(0.0 < self.client_gpus <= 1.0, "federation.client_gpus", self.client_gpus,
               "a share of one GPU in (0, 1], e.g. 0.5 for two clients per GPU")
        _check(self.server_threads >= 0, "federation.server_threads", self.server_threads,
               "0 (auto) or a positive integer")

    @property
    def sampled(self) -> int:
        return self.clients_per_round or self.clients


STRATEGY_NAMES = ("fedavg", "ffa-lora", "flora", "fedprox", "fedadam", "fedyogi", "fedavgm",
                  "median", "trimmed-mean", "krum")
TransportKind = Literal["float16", "float32", "int8"]
WeightingKind = Literal["capped", "reported", "equal"]
# How the global adapter maps onto a node's model (see fedcl/layouts.py):
# ffa-lora freezes lora_A at its seeded init; flora ships a merged residual.
ADAPTER_LAYOUTS = {"ffa-lora": "frozen-a", "flora": "residual"}


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"
    # Wire format of adapters. float16 halves traffic; updates (not weights)
    # travel up, so the rounding error is relative to the small update.
    # int8 quantises the update with one scale per tensor.
    transport: TransportKind = "float16"
    # fedprox: weight of the client's proximal term mu/2 ||w - w_global||^2.
    proximal_mu: float = 0.01
    # fedadam/fedyogi server step; Flower's 0.1 moves LoRA factors far more
    # than a round of local training does, so the default is small.
    server_lr: float = 1e-3
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    # fedavgm: server SGD step and momentum on the averaged update.
    momentum_lr: float = 1.0
    momentum: float = 0.9
    # trimmed-mean: fraction cut at each end, per coordinate.
    trim_fraction: float = 0.2
    # krum: assumed malicious clients, and how many replies to average (1: Krum).
    num_malicious: int = 1
    krum_keep: int = 1
    # Reply screening: largest accepted L2 norm of a client's update (0: off)
    # and largest accepted example count (0: only "no more than first reported").
    max_update_norm: float = 0.0
    max_examples: int = 0
    # How much a reply weighs (strategies/weighting.py): "capped" = its reported
    # example count, at most weight_cap x the round's median count (a client's
    # claim is unverifiable; with 3 an inflated claim weighs as three typical
    # clients, never as the whole round); "reported" = as reported (Flower's
    # FedAvg); "equal" = 1 each.
    # Evaluation replies are weighed by the same rule.
    weighting: WeightingKind = "capped"
    weight_cap: float = 3.0

    def __post_init__(self) -> None:
        _check_finite(self, "strategy")
        _check_choice("strategy.name", self.name, STRATEGY_NAMES)
        _check_choice("strategy.transport", self.transport, get_args(TransportKind))
        for key in ("proximal_mu", "max_update_norm"):
            value = getattr(self, key)
            _check(value >= 0 and math.isfinite(value), f"strategy.{key}", value, "0 (off) or a positive number")
        for key in ("server_lr", "tau", "momentum_lr"):
            value = getattr(self, key)
            _check(value > 0 and math.isfinite(value), f"strategy.{key}", value, "a positive number")
        for key in ("beta_1", "beta_2", "momentum"):
            _check(0.0 <= getattr(self, key) < 1.0, f"strategy.{key}", getattr(self, key), "a float in [0, 1)")
        _check(0.0 <= self.trim_fraction < 0.5, "strategy.trim_fraction", self.trim_fraction,
               "a float in [0, 0.5)")
        _check(self.num_malicious >= 0, "strategy.num_malicious", self.num_malicious, "0 or a positive integer")
        _check(self.krum_keep >= 1, "strategy.krum_keep", self.krum_keep, "a positive integer")
        _check(self.max_examples >= 0, "strategy.max_examples", self.max_examples, "0 (off) or a positive integer")
        _check_choice("strategy.weighting", self.weighting, get_args(WeightingKind))
        _check(self.weight_cap >= 1.0, "strategy.weight_cap", self.weight_cap,
               "a number >= 1 (a multiple of the round's median example count)")

    @property
    def adapter_layout(self) -> str:
        return ADAPTER_LAYOUTS.get(self.name, "lora")

    @property
    def client_proximal_mu(self) -> float:
        """The proximal weight clients apply: only fedprox has one."""
        return self.proximal_mu if self.name == "fedprox" else 0.0


PrivacyMode = Literal["sample", "client"]
AccountantKind = Literal["rdp", "prv"]


@dataclass(frozen=True)
class PrivacyConfig:
    # DP is on when noise_multiplier > 0 or target_epsilon > 0 (give one, not
    # both); `mode` says whom it protects: "sample" runs DP-SGD on each client
    # (every training record, a lifetime ledger per node), "client" adds noise
    # on the server over whole client updates (who took part).
    mode: PrivacyMode = "sample"
    noise_multiplier: float = 0.0
    # Epsilon for the whole planned schedule (all local steps of all
    # federation.rounds); the noise is calibrated once, up front, to reach it.
    target_epsilon: float = 0.0
    delta: float = 1e-5
    # Per-sample (mode "sample") or per-client-update (mode "client") L2 clip.
    max_grad_norm: float = 1.0
    # Lifetime cap on a node's ledger across rounds, resumes and runs (0: no
    # lifetime cap; each run still costs at most target_epsilon).
    budget_epsilon: float = 0.0
    accountant: AccountantKind = "rdp"

    def __post_init__(self) -> None:
        _check_finite(self, "privacy")
        _check_choice("privacy.mode", self.mode, get_args(PrivacyMode))
        # One mode at a time: client-level DP (server-side, strategies/client_dp.py)
        # keeps no per-node ledger, so a lifetime node budget means sample-level DP.
        _check(self.mode == "sample" or self.budget_epsilon == 0, "privacy.budget_epsilon",
               self.budget_epsilon, '0 with privacy.mode = "client" (a node\'s lifetime budget is '
               'sample-level DP, mode "sample"; the two modes do not combine)')
        _check_choice("privacy.accountant", self.accountant, get_args(AccountantKind))
        for key in ("noise_multiplier", "target_epsilon", "budget_epsilon"):
            value = getattr(self, key)
            _check(value >= 0 and math.isfinite(value), f"privacy.{key}", value, "0 (off) or a positive number")
        _check(not (self.noise_multiplier > 0 and self.target_epsilon > 0), "privacy.noise_multiplier",
               self.noise_multiplier, "0 when privacy.target_epsilon is set (give one of the two)")
        _check(0.0 < self.delta < 1.0, "privacy.delta", self.delta, "a float in (0, 1), well below 1/records")
        _check(self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm), "privacy.max_grad_norm",
               self.max_grad_norm, "a positive number")
        _check(self.budget_epsilon == 0 or self.enabled, "privacy.budget_epsilon", self.budget_epsilon,
               "0 unless privacy.target_epsilon or privacy.noise_multiplier turns DP on")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0 or self.target_epsilon > 0

    @property
    def epsilon_cap(self) -> float:
        """The most a node's ledger may reach over its life: the budget, or no cap.

        target_epsilon is what one run's schedule costs (the noise is
        calibrated to it); a node that joins several runs composes them, so
        only budget_epsilon bounds the lifetime total.
        """
        return self.budget_epsilon or math.inf


CONTINUAL_STRATEGIES = ("naive", "replay", "ewc", "replay+ewc")
# "avalanche:<Name>": Avalanche's plugin strategies (continual/avalanche_bridge.py), by
# short name; the plugin's class name (e.g. "LwFPlugin") is accepted too.
AVALANCHE_PLUGINS = {"LwF": "LwFPlugin", "EWC": "EWCPlugin", "SI": "SynapticIntelligencePlugin",
                     "MAS": "MASPlugin", "AGEM": "AGEMPlugin", "Replay": "ReplayPlugin"}
# With DP-SGD (privacy.mode = "sample") only LwF: its distillation term is computed
# through the forward pass on each example, so per-sample clipping and noise cover it,
# and its task end keeps a model copy and the label set (no pass over data). The others
# add terms of the weights alone (EWC, SI, MAS: dropped by Opacus's optimizer) or use
# raw records outside DP-SGD (importances, A-GEM's reference gradients, replay memories).
AVALANCHE_DP_PLUGINS = ("LwF",)


def avalanche_plugin(strategy: str) -> str | None:
    """The short plugin name of an ``avalanche:<Name>`` strategy, None for fedcl's own."""
    if not strategy.startswith("avalanche:"):
        return None
    given = strategy.split(":", 1)[1]
    for short, class_name in AVALANCHE_PLUGINS.items():
        if given in (short, class_name):
            return short
    raise ConfigError(f"continual.strategy: got {strategy!r}; Avalanche strategies are "
                      + ", ".join(f"avalanche:{name}" for name in AVALANCHE_PLUGINS))


@dataclass(frozen=True)
class ContinualConfig:
    # Only read when data.task_column is set (continual learning on); see continual/.
    # naive, replay, ewc, replay+ewc, or avalanche:<Name> (LwF, EWC, SI, MAS, AGEM, Replay).
    strategy: str = "naive"
    # The chance that a client holds a given task (1: every client holds every task);
    # a task is always held by at least one client.
    task_presence: float = 1.0
    # Federated rounds spent on each task; the run has tasks x rounds_per_task rounds
    # (federation.rounds is then ignored).
    rounds_per_task: int = 2
    # Replay: records kept per client (they never leave it), the share of each
    # mixed batch that is replay (0.5 doubles a batch, as Avalanche), per-class quotas.
    replay_capacity: int = 200
    replay_ratio: float = 0.5
    replay_balanced: bool = False
    # Online EWC: lambda (depends on the loss scale, so tune it) and gamma
    # (1 sums every task's Fisher, < 1 fades old ones).
    ewc_strength: float = 100.0
    ewc_decay: float = 1.0
    fisher_batch_size: int = 8
    # Federated importance (the FedCurv idea): at each task end clients send their
    # Fisher diagonal, the server averages them, and every client's EWC uses the
    # federation's importance (strategies/importance.py). Needs ewc or replay+ewc.
    federated_importance: bool = False

    def __post_init__(self) -> None:
        _check_finite(self, "continual")
        if avalanche_plugin(self.strategy) is not None:
            import importlib.util

            if importlib.util.find_spec("avalanche") is None:
                raise ConfigError(f"continual.strategy: {self.strategy!r} needs the avalanche-lib package, "
                                  "which is not installed here (`make install` installs it)")
        else:
            _check_choice("continual.strategy", self.strategy, CONTINUAL_STRATEGIES)
        _check(0.0 < self.task_presence <= 1.0, "continual.task_presence", self.task_presence,
               "a float in (0, 1]")
        _check(1 <= self.rounds_per_task <= 10_000, "continual.rounds_per_task", self.rounds_per_task,
               "a positive integer")
        _check(self.replay_capacity >= 1, "continual.replay_capacity", self.replay_capacity, "a positive integer")
        _check(0.0 <= self.replay_ratio < 1.0, "continual.replay_ratio", self.replay_ratio, "a float in [0, 1)")
        _check(self.ewc_strength >= 0 and math.isfinite(self.ewc_strength), "continual.ewc_strength",
               self.ewc_strength, "a number >= 0")
        _check(0.0 <= self.ewc_decay <= 1.0, "continual.ewc_decay", self.ewc_decay, "a float in [0, 1]")
        _check(self.fisher_batch_size >= 1, "continual.fisher_batch_size", self.fisher_batch_size,
               "a positive integer")
        _check(not self.federated_importance or self.strategy in ("ewc", "replay+ewc"),
               "continual.federated_importance", self.federated_importance,
               f"false unless continual.strategy is ewc or replay+ewc (it is {self.strategy!r})")


@dataclass(frozen=True)
class RunConfig:
    # The run folder the server writes (resolved config, metrics, adapters).
    out_dir: str = ""
    # Simulation only: root of the virtual nodes' own state folders (one
    # `client-<id>/` each). In deployment each node names its own.
    state_dir: str = ""
    # A saved global adapter folder (PEFT format, e.g. an adapter registry
    # version's `adapter/`) that round 1 starts from instead of a fresh adapter.
    init_adapter: str = ""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        # Client-level DP calibrates its noise to a plain average of clipped updates.
        client_dp_strategies = ("fedavg", "ffa-lora", "fedprox")
        _check(not (self.privacy.enabled and self.privacy.mode == "client")
               or self.strategy.name in client_dp_strategies, "strategy.name", self.strategy.name,
               f'one of {", ".join(client_dp_strategies)} with privacy.mode = "client"')
        # Under DP-SGD, Avalanche's plugins other than LwF add loss terms Opacus's optimizer
        # drops or read raw data outside it (AVALANCHE_DP_PLUGINS). Client-level DP clips
        # and noises the whole update, whatever local training produced it.
        plugin = avalanche_plugin(self.continual.strategy) if self.continual_on else None
        _check(not (self.privacy.enabled and self.privacy.mode == "sample" and plugin is not None
                    and plugin not in AVALANCHE_DP_PLUGINS),
               "continual.strategy", self.continual.strategy,
               "one of naive, replay, ewc, replay+ewc or "
               + ", ".join(f"avalanche:{name}" for name in AVALANCHE_DP_PLUGINS)
               + " with DP-SGD (privacy.mode = \"sample\"): the other Avalanche plugins are not "
               "accounted for under DP-SGD (continual/avalanche_bridge.py)")
        # Client-level DP noises the adapter update only; the importances would travel unprotected.
        _check(not (self.privacy.enabled and self.privacy.mode == "client" and self.continual_on
                    and self.continual.federated_importance), "continual.federated_importance", True,
               'false with privacy.mode = "client" (its noise does not cover the importances)')

    @property
    def continual_on(self) -> bool:
        """Continual learning is on when the data name a task column."""
        return bool(self.data.task_column or self.data.task_groups or self.data.task_files)

    # -- conversions -------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """Dotted keys, as Flower's run_config carries them."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
            lines.append("")
        return "\n".join(lines)

    def replace(self, updates: dict[str, Any], source: str = "override") -> "Config":
        """Return a copy with dotted-key updates applied and validated."""
        return build_config(_nest(updates, source), base=self, source=source)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # JSON's string escapes (\\ \" \n \r \t \uXXXX) are all valid in a TOML basic
    # string; DEL is the one control character JSON leaves raw and TOML forbids.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


SECTIONS: dict[str, type] = {f.name: f.type for f in fields(Config)}  # type: ignore[misc]
_SECTION_TYPES = get_type_hints(Config)


def _nest(flat: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, dot, name = key.partition(".")
        if not dot or not name:
            raise ConfigError(f"{source}: key {key!r} must look like section.key (e.g. train.lr)")
        nested.setdefault(section, {})[name] = value
    return nested


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert `value` (from TOML or a command-line string) to the field's type."""
    choices = get_args(typ)
    if choices:  # Literal
        typ = str
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        _check(isinstance(value, bool), key, value, "true or false")
        return value
    if typ is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{key}: got {value!r}, expected an integer") from None
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
        return value
    if typ is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: got {value!r}, expected a number") from None
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "a number")
        return float(value)
    if isinstance(value, list):  # TOML arrays for list-like settings
        _check(all(isinstance(v, str) for v in value), key, value, "a list of strings")
        return ",".join(value)
    _check(isinstance(value, str), key, value, "a string")
    return value


def build_config(nested: dict[str, Any], base: Config | None = None, source: str = "config") -> Config:
    """Apply a nested {section: {key: value}} mapping onto `base` (default: defaults)."""
    base = base or Config()
    sections = {}
    for section, values in nested.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(
                f"{source}: unknown section [{section}]; known sections: {', '.join(_SECTION_TYPES)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of key = value")
        cls = _SECTION_TYPES[section]
        hints = get_type_hints(cls)
        current = getattr(base, section)
        updates = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}; known keys of [{section}]: {', '.join(hints)}"
                )
            try:
                updates[key] = _coerce(f"{section}.{key}", value, hints[key])
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}") from None
        try:
            sections[section] = dataclasses.replace(current, **updates)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    return dataclasses.replace(base, **sections)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    """Defaults <- TOML file <- `section.key=value` overrides, validated."""
    config = base or Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            nested = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        config = build_config(nested, base=config, source=str(path))
    flat = {}
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        flat[key.strip()] = value.strip()
    if flat:
        config = build_config(_nest(flat, "--set"), base=config, source="--set")
    return config


def explicit_keys(path: str | Path | None = None, overrides: list[str] | None = None) -> set[str]:
    """The dotted keys a TOML file and `--set` overrides name: what the user set, not the defaults."""
    keys = {item.partition("=")[0].strip() for item in overrides or [] if "=" in item}
    if path is not None and Path(path).is_file():
        nested = tomllib.loads(Path(path).read_text(encoding="utf-8"))  # load_config has checked it
        keys |= {f"{section}.{key}" for section, values in nested.items() if isinstance(values, dict)
                 for key in values}
    return keys


# Settings read only in some modes: (keys, why they do nothing, when that holds).
_STRATEGY_ONLY = {"proximal_mu": ("fedprox",), "server_lr": ("fedadam", "fedyogi"),
                  "beta_1": ("fedadam", "fedyogi"), "beta_2": ("fedadam", "fedyogi"),
                  "tau": ("fedadam", "fedyogi"), "momentum_lr": ("fedavgm",), "momentum": ("fedavgm",),
                  "trim_fraction": ("trimmed-mean",), "num_malicious": ("krum",), "krum_keep": ("krum",)}
_CLASSIFICATION_ONLY = ("text_column", "label_column", "labels", "label_words", "missing_labels",
                        "classification_template")
_INSTRUCTION_ONLY = ("prompt_column", "response_column", "instruction_template")


def _ineffective_reason(config: Config, key: str) -> str | None:
    """Why the setting `key` has no effect under `config`, or None when it has one."""
    section, _, name = key.partition(".")
    d, p = config.data, config.privacy
    rules: list[tuple[bool, str]] = []
    if section == "privacy" and name not in ("noise_multiplier", "target_epsilon"):
        rules.append((not p.enabled, "differential privacy is off (privacy.target_epsilon and "
                                     "privacy.noise_multiplier are 0)"))
    elif section == "continual":
        rules.append((not config.continual_on, "continual learning is off (data.task_column, "
                                               "data.task_groups and data.task_files are empty)"))
    elif section == "strategy" and name in _STRATEGY_ONLY:
        used_by = _STRATEGY_ONLY[name]
        rules.append((config.strategy.name not in used_by, f"only strategy.name = {' or '.join(used_by)} "
                                                           f"reads it (it is {config.strategy.name!r})"))
    elif section == "data":
        rules += [
            (name == "alpha" and d.partition != "dirichlet", f"data.partition is {d.partition!r}, not 'dirichlet'"),
            (name == "partition_column" and d.partition != "column", f"data.partition is {d.partition!r}, not 'column'"),
            (name == "task_period" and not d.task_column, "data.task_column is empty"),
            (name == "test_fraction" and bool(d.test_path or d.task_test_files),
             "a test file is given (data.test_path or data.task_test_files)"),
            (name == "dataset" and bool(d.path or d.task_files), "data.path or data.task_files is set"),
            (name in _CLASSIFICATION_ONLY and d.task != "classification", "data.task is 'instruction'"),
            (name in _INSTRUCTION_ONLY and d.task != "instruction", "data.task is 'classification'"),
        ]
    elif key == "strategy.weight_cap":
        rules.append((config.strategy.weighting != "capped",
                      f'only strategy.weighting = "capped" reads it (it is {config.strategy.weighting!r})'))
    elif key == "lora.frozen_cache":
        rules.append((config.lora.top_layers == 0, "lora.top_layers is 0 (no frozen layers to cache)"))
    elif key == "train.micro_batch_size":
        rules.append((not (p.enabled and p.mode == "sample"), 'it splits DP-SGD batches (privacy.mode = '
                                                              '"sample" with DP on)'))
    elif key in ("train.threshold", "train.target_precision", "train.threshold_validation"):
        rules.append((not config.train.positive_label, "train.positive_label is empty"))
    return next((why for holds, why in rules if holds), None)


def warn_ineffective(config: Config, keys: set[str]) -> list[str]:
    """Log one warning per explicitly set key that has no effect in this configuration; return them."""
    import logging

    messages = []
    for key in sorted(keys):
        why = _ineffective_reason(config, key)
        if why:
            messages.append(f"{key} is set but has no effect: {why}")
            logging.getLogger("fedcl.config").warning("%s", messages[-1])
    return messages


# pyproject's [tool.flwr.app.config] holds these values where they are not "" (not set there).
FLWR_APP_VALUES = {"config": "", "run.out_dir": "runs/flwr-run"}


def flwr_app_config() -> dict[str, Any]:
    """What pyproject's `[tool.flwr.app.config]` must declare: every key (Flower refuses a
    `--run-config` key not declared there), each as "" (not set: the file named by `config`,
    else the default, holds) but for `FLWR_APP_VALUES`. tests/test_robust_server.py checks it."""
    return {key: FLWR_APP_VALUES.get(key, "") for key in ["config", *Config().to_flat()]}


def from_run_config(run_config: dict[str, Any]) -> Config:
    """Rebuild the typed config inside a Flower app from its flat run_config.

    `flwr run .` passes pyproject's `[tool.flwr.app.config]`, whose `config`
    key names a TOML file ("" = none) and whose other dotted keys override it,
    except those still "" (`flwr_app_config`: declared, not set). A run config
    without `config` (the simulation's, `Config.to_flat`) is taken as it is.
    """
    flat = dict(run_config)
    if "config" in flat:
        flat = {key: value for key, value in flat.items() if value != "" or key == "config"}
    path = flat.pop("config", "") or None
    config = load_config(path) if path else Config()
    return build_config(_nest(flat, "run_config"), base=config, source="run_config") if flat else config
