"""Avalanche's plugin strategies inside a client's local training (``continual.strategy = "avalanche:<Name>"``).

Each federated round, the node trains with an Avalanche ``Naive`` strategy
whose plugin is the chosen one (LwF, EWC, SI, MAS, A-GEM or replay), on our
PEFT model and on the same batches fedcl's own loop would draw
(`fedcl.train.sample_batches`, in order). The model is wrapped as an
ordinary classifier (`VerbalizerClassifier`: token ids in, the label words'
logits out), so Avalanche's cross-entropy criterion is our classification
loss and its plugins see plain tensors.

Task boundaries. A task spans ``continual.rounds_per_task`` rounds, one
``train()`` call each, and Avalanche would treat every call as a finished
experience: LwF would take a new teacher every round, EWC would compute an
importance every round. The bridge therefore holds back the plugin's
``after_training_exp`` during rounds (`_TaskGate`) and runs it once in
`after_task`, which the node calls when the task is closed: on the whole
task's share of this node's data, with the global adapter after the task
loaded, which is the anchor our own EWC uses too.

Under DP-SGD (``privacy.mode = "sample"``) only LwF runs
(`fedcl.config.AVALANCHE_DP_PLUGINS`). Its distillation term is computed
through the forward pass on each example, so fedcl's DP-SGD loop
(`fedcl.privacy.dpsgd.train_private`, Poisson batches, Opacus) trains on the
cross-entropy plus the plugin's own term (`dp_batch_loss`), and every
example's clipped, noised gradient covers both. Its task end
(`after_task_private`) sees no data: the teacher is the global adapter (DP
output already), and the class set is every label of the run rather than the
ones the node's records hold. The other plugins add terms of the weights alone
(EWC, SI, MAS), which Opacus's optimizer drops, or pass over raw data outside
DP-SGD (importances, A-GEM's reference gradients, replay memories), so
`fedcl.config` refuses them with DP-SGD on. Client-level DP clips and noises
the whole update, so every plugin runs under it. EWC, MAS, SI and LwF here
also keep copies of every parameter of the model they are given, frozen base
weights included (LwF a whole model): fine for small models, costly for
large ones, where fedcl's own ``ewc`` keeps the adapter only.

Importing Avalanche takes seconds (it pulls in torchvision and more), so it
is imported only when such a strategy is built.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from fedcl.atomic import write_bytes
from fedcl.config import AVALANCHE_DP_PLUGINS, AVALANCHE_PLUGINS, ContinualConfig, TrainConfig
from fedcl.continual.methods import Method
from fedcl.optim import build_optimizer
from fedcl.tasks import Batch, ClassificationTask, decoder_and_head

KIND = "fedcl.continual.avalanche"
VERSION = 1


def plugin_arguments(name: str, cfg: ContinualConfig, train: TrainConfig) -> tuple[str, dict]:
    """The Avalanche plugin class and its arguments for a canonical name in `AVALANCHE_PLUGINS`.

    Knobs fedcl already has map onto the plugin's own (EWC's lambda is
    ``continual.ewc_strength``; memories hold ``continual.replay_capacity``
    examples); the rest keep Avalanche's documented defaults.
    """
    if name == "LwF":
        return "LwFPlugin", {"alpha": 1.0, "temperature": 2.0}
    if name == "EWC":
        online = cfg.ewc_decay < 1.0
        return "EWCPlugin", {"ewc_lambda": cfg.ewc_strength, "mode": "online" if online else "separate",
                             "decay_factor": cfg.ewc_decay if online else None}
    if name == "SI":
        return "SynapticIntelligencePlugin", {"si_lambda": 1e-4}
    if name == "MAS":
        return "MASPlugin", {"lambda_reg": 1.0, "alpha": 0.5}
    if name == "AGEM":
        return "AGEMPlugin", {"patterns_per_experience": cfg.replay_capacity, "sample_size": train.batch_size}
    if name == "Replay":
        return "ReplayPlugin", {"mem_size": cfg.replay_capacity}
    raise ValueError(f"no Avalanche plugin {name!r}; supported: {', '.join(AVALANCHE_PLUGINS)}")


class VerbalizerClassifier(torch.nn.Module):
    """A causal LM as a classifier over packed inputs: x is (B, 2, T) = token ids and attention mask.

    It keeps only the label words' token ids, not the task (whose tokenizer
    would be copied along with every model copy a plugin takes).
    """

    def __init__(self, model: torch.nn.Module, label_token_ids: Sequence[int]):
        super().__init__()
        self.model = model
        self.register_buffer("label_token_ids", torch.tensor(list(label_token_ids), dtype=torch.long),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decoder, head = decoder_and_head(self.model)
        hidden = decoder(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state[:, -1, :]
        rows = head.weight[self.label_token_ids]
        return (hidden @ rows.to(hidden.dtype).T).float()


def pack(batch: Batch) -> torch.Tensor:
    """Token ids and attention mask as one (B, 2, T) tensor, the x Avalanche's loaders carry."""
    return torch.stack([batch.input_ids, batch.attention_mask], dim=1)


class _Examples(torch.utils.data.Dataset):
    """(x, class index) pairs; Avalanche appends the task label to each item."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def make_dataset(task: ClassificationTask, records: Sequence[dict]):
    """An Avalanche classification dataset of `records`, in order (task label 0: one shared head)."""
    from avalanche.benchmarks.utils import DataAttribute
    from avalanche.benchmarks.utils.classification_dataset import TaskAwareSupervisedClassificationDataset

    batch = task.encode(list(records))
    targets = batch.targets.tolist()
    return TaskAwareSupervisedClassificationDataset(
        [_Examples(pack(batch), batch.targets)],
        data_attributes=[DataAttribute(targets, "targets"),
                         DataAttribute([0] * len(targets), "targets_task_labels", use_in_getitem=True)])


def make_experience(task: ClassificationTask, records: Sequence[dict], index: int):
    from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience

    return DatasetExperience(dataset=make_dataset(task, records), current_experience=index)


def _plugin_base():
    from avalanche.core import SupervisedPlugin

    return SupervisedPlugin


class _TaskGate:
    """Forwards every callback to the plugin except ``after_training_exp``, which `after_task` runs."""

    def __init__(self, plugin):
        self.plugin = plugin

    def __getattr__(self, name):
        if name == "after_training_exp":
            return lambda strategy, **kwargs: None
        return getattr(self.plugin, name)


def _loop_plugin(params: list[torch.nn.Parameter], max_grad_norm: float,
                 extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None, model: torch.nn.Module,
                 on_step: Callable[[float, int, int], None]):
    """fedcl's own per-step work inside Avalanche's loop: the extra loss term, clipping, bookkeeping."""
    base = _plugin_base()

    class FedclStep(base):
        def before_backward(self, strategy, **kwargs):
            if extra_loss is not None:  # e.g. FedProx's proximal term
                strategy.loss = strategy.loss + extra_loss(model)

        def before_update(self, strategy, **kwargs):
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)

        def after_training_iteration(self, strategy, **kwargs):
            x = strategy.mb_x
            on_step(float(strategy.loss.detach()), int(x.shape[0]), int(x[:, 1].sum()))

    return FedclStep()


def build_plugin(name: str, cfg: ContinualConfig, train: TrainConfig):
    import avalanche.training.plugins as plugins

    class_name, kwargs = plugin_arguments(name, cfg, train)
    return getattr(plugins, class_name)(**kwargs)


class AvalancheMethod(Method):
    """One Avalanche plugin as a fedcl continual method; its state lives in the node's folder."""

    def __init__(self, plugin_name: str, cfg: ContinualConfig, train: TrainConfig):
        self.plugin_name = plugin_name
        self.name = f"avalanche:{plugin_name}"
        self.cfg, self.train_cfg = cfg, train
        self.plugin = build_plugin(plugin_name, cfg, train)
        self.task_index = 0
        self.closed = 0  # tasks whose end this node has run (Avalanche's experience counter)
        self.file = f"avalanche-{plugin_name.lower()}.pt"

    # -- the strategy around a model ---------------------------------------------------------
    def _strategy(self, model, task: ClassificationTask, extra_plugins: Sequence = ()):
        from avalanche.training.plugins import EvaluationPlugin
        from avalanche.training.supervised import Naive

        if not isinstance(task, ClassificationTask):
            raise ValueError(f"{self.name}: Avalanche strategies need a classification task")
        net = VerbalizerClassifier(model, task.label_token_ids)
        params = [p for p in model.parameters() if p.requires_grad]
        strategy = Naive(model=net, optimizer=build_optimizer(params, self.train_cfg),
                     criterion=torch.nn.CrossEntropyLoss(label_smoothing=self.train_cfg.label_smoothing),
                     train_mb_size=self.train_cfg.batch_size, train_epochs=1,
                     eval_mb_size=self.train_cfg.eval_batch_size,
                     device=next(model.parameters()).device,  # Avalanche moves the model there
                     plugins=[_TaskGate(self.plugin), *extra_plugins],
                     evaluator=EvaluationPlugin(loggers=[]))  # no console logger in a node's output
        # A strategy lives for one round or one task end, so its clock is set from the
        # node's own count: plugins key their memories and penalties by it.
        strategy.clock.train_exp_counter = self.closed
        return strategy

    # -- hooks -----------------------------------------------------------------------------
    def before_task(self, index, records) -> None:
        self.task_index = index

    def train_round(self, model, task, records: list, train_cfg: TrainConfig, model_cfg, *, seed: int,
                    extra_loss=None, progress=None):
        """One round's `train_cfg.local_steps` steps through Avalanche's loop -> `fedcl.train.TrainResult`."""
        from fedcl.train import TrainResult, autocast, sample_batches

        start = time.perf_counter()
        chunks = list(sample_batches(records, train_cfg.batch_size, train_cfg.local_steps, seed))
        # One dataset of the round's batches in order; an unshuffled loader with the same
        # batch size gives back exactly these batches (each padded to the round's longest).
        experience = make_experience(task, [r for chunk in chunks for r in chunk], self.task_index)
        losses, counts = [], {"examples": 0, "tokens": 0}

        def on_step(loss: float, examples: int, tokens: int) -> None:
            losses.append(loss)
            counts["examples"] += examples
            counts["tokens"] += tokens
            if progress is not None:
                progress(len(losses), loss)

        params = [p for p in model.parameters() if p.requires_grad]
        step = _loop_plugin(params, train_cfg.max_grad_norm, extra_loss, model, on_step)
        strategy = self._strategy(model, task, [step])
        torch.manual_seed(seed)  # plugins that sample (replay, A-GEM) draw from torch's generator
        with autocast(model_cfg):
            strategy.train(experience, eval_streams=[], shuffle=False)
        model.eval()
        if not losses:
            raise RuntimeError(f"{self.name}: Avalanche ran no training step on {len(records)} records")
        return TrainResult(sum(losses) / len(losses), len(losses), counts["examples"], counts["tokens"],
                           time.perf_counter() - start)

    def after_task(self, model, task, records, *, fisher=None) -> None:
        """The plugin's end of experience, once per task, on the node's whole share of it."""
        if not records:  # a client without this task's data has nothing to remember of it
            return
        strategy = self._strategy(model, task)
        strategy.experience = make_experience(task, records, self.task_index)
        strategy.is_training = True
        was_training = model.training
        try:
            self.plugin.after_training_exp(strategy)
            self.closed += 1
        finally:
            strategy.experience = None
            model.train(was_training)

    # -- under DP-SGD (LwF only, see the module docstring) ------------------------------------
    def dp_batch_loss(self, model, task: ClassificationTask, batch: Batch) -> torch.Tensor:
        """The batch's mean cross-entropy plus the plugin's term, for `train_private`'s `batch_loss`."""
        if self.plugin_name not in AVALANCHE_DP_PLUGINS:
            raise ValueError(f"{self.name} does not run under DP-SGD; supported: "
                             + ", ".join(f"avalanche:{n}" for n in AVALANCHE_DP_PLUGINS))
        net = VerbalizerClassifier(model, task.label_token_ids)
        x = pack(batch)
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, batch.targets, label_smoothing=task.label_smoothing)
        # LwF's own call: the teacher's logits on the same examples, distilled with its
        # alpha and temperature (0 before the first task end).
        return loss + self.plugin.lwf(x, logits, net)

    def after_task_private(self, model, task: ClassificationTask) -> None:
        """The plugin's end of experience without the node's records (one placeholder per label)."""
        if self.plugin_name not in AVALANCHE_DP_PLUGINS:
            raise ValueError(f"{self.name} does not run under DP-SGD")
        self.after_task(model, task, [{"text": "", "label": label, "meta": {}} for label in task.labels])

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # The plugin object is the state (teacher model, importances, memory): Avalanche
        # gives plugins no state_dict, so it is kept whole, minus live iterators.
        return {**super().state_dict(), "plugin": _picklable(self.plugin), "task_index": self.task_index,
                "closed": self.closed}

    def load_state_dict(self, state, source="method state") -> None:
        super().load_state_dict(state, source)
        self.plugin = _revive(state["plugin"])
        self.task_index, self.closed = int(state["task_index"]), int(state["closed"])

    def save(self, folder) -> None:
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        write_bytes(Path(folder) / self.file, buffer.getvalue())

    def load(self, folder) -> None:
        path = Path(folder) / self.file
        if path.exists():
            # A pickle (Avalanche's plugins are plain objects): this file is written by the
            # node itself into its own state folder, never received from elsewhere.
            self.load_state_dict(torch.load(path, weights_only=False), str(path))


def _picklable(plugin):
    """A shallow copy of `plugin` without A-GEM's memory loader and its live iterator (a generator)."""
    if not hasattr(plugin, "buffer_dliter"):
        return plugin
    import copy

    clone = copy.copy(plugin)
    clone.buffer_dataloader, clone.buffer_dliter = None, iter(())
    return clone


def _revive(plugin):
    """Rebuild what `_picklable` left out, as A-GEM's own memory update builds it."""
    if hasattr(plugin, "buffer_dliter") and getattr(plugin, "buffers", None):
        from avalanche.benchmarks.utils.data_loader import GroupBalancedInfiniteDataLoader

        plugin.buffer_dataloader = GroupBalancedInfiniteDataLoader(
            plugin.buffers, batch_size=plugin.sample_size // len(plugin.buffers))
        plugin.buffer_dliter = iter(plugin.buffer_dataloader)
    return plugin


def avalanche_transfer(matrix: list[list[float]]) -> dict[str, float | None]:
    """Forgetting and backward transfer by Avalanche's own metric classes, from an accuracy matrix.

    Avalanche's definitions: for each finished earlier task j, the accuracy
    right after training on it (R[j][j]) against the latest (R[K-1][j]),
    averaged over j. Used to cross-check `continual.metrics`.
    """
    from avalanche.evaluation.metrics.forgetting_bwt import BWT, Forgetting

    forgetting, bwt = Forgetting(), BWT()
    last = len(matrix) - 1
    for j in range(last):
        for metric in (forgetting, bwt):
            metric.update(j, matrix[j][j], initial=True)
            metric.update(j, matrix[last][j])
    f, b = forgetting.result(), bwt.result()
    return {"forgetting": sum(f.values()) / len(f) if f else None,
            "bwt": sum(b.values()) / len(b) if b else None}
