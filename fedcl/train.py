"""Local training and evaluation of a LoRA model, in plain PyTorch.

`train_local` runs a client's optimiser steps for one round; `evaluate` scores
a model on a list of records. Neither knows about Flower: the ClientApp and
the server's global evaluation call them.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from fedcl import accelerator, metrics
from fedcl.config import ModelConfig, TrainConfig
from fedcl.optim import build_optimizer
from fedcl.tasks import Batch, ClassificationTask


@dataclass
class TrainResult:
    loss: float  # mean training loss over the round's steps
    steps: int
    examples: int  # examples seen, with repeats
    tokens: int  # non-padding tokens processed
    seconds: float


def autocast(model_cfg: ModelConfig):
    """bfloat16 autocast on the CPU when configured. Only where the CPU has native
    bfloat16 matmuls: without them it is far slower than float32 (README, "Performance";
    a no-grad pass through 6 SmolLM2 layers at 32 x 64 tokens took 4.7-9.1 s in float32
    and 37-77 s under autocast here, 3 interleaved repeats, one thread, a busy machine).

    On a GPU the base's weights are already in the compute dtype
    (`fedcl.accelerator.base_dtype`) and LoRA computes in float32: no autocast.
    """
    if model_cfg.compute_dtype == "bfloat16" and accelerator.resolve_device(model_cfg.device).type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_scaler(model_cfg: ModelConfig, params: list[torch.nn.Parameter]) -> torch.amp.GradScaler:
    """Loss scaling for float16 (`fedcl.accelerator.needs_loss_scaling`); a no-op scaler otherwise."""
    device = params[0].device if params else torch.device("cpu")
    return torch.amp.GradScaler(device.type, enabled=accelerator.needs_loss_scaling(model_cfg))


def sample_batches(records: list, batch_size: int, steps: int, seed: int) -> Iterator[list]:
    """`steps` batches drawn epoch by epoch from a seeded shuffle of `records`."""
    if not records:
        raise ValueError("cannot train on an empty set of records")
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(records)))
            rng.shuffle(fresh)
            order.extend(fresh)
        take, order = order[:batch_size], order[batch_size:]
        yield [records[i] for i in take]


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_local(model, task, records: list, train_cfg: TrainConfig, model_cfg: ModelConfig, *,
                seed: int, extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
                mix: Callable[[Iterator[list]], Iterable[list]] | None = None,
                progress: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run `train_cfg.local_steps` AdamW steps on `records`.

    `extra_loss(model)` is added to each step's loss (e.g. a proximal or EWC term);
    `mix(batches)` may rewrite the sampled batches (e.g. append replayed records).
    """
    params = trainable_parameters(model)
    optimizer = build_optimizer(params, train_cfg)
    scaler = grad_scaler(model_cfg, params)
    model.train()
    start, losses, examples, tokens = time.perf_counter(), [], 0, 0
    batches = sample_batches(records, train_cfg.batch_size, train_cfg.local_steps, seed)
    for step, chunk in enumerate(mix(batches) if mix is not None else batches):
        batch = task.encode(chunk)
        with autocast(model_cfg):
            loss = task.per_example_loss(model, batch).mean()
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clipping and the update see the true gradients
        if train_cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
        scaler.step(optimizer)  # skipped when float16 overflowed; the scale then halves
        scaler.update()
        losses.append(float(loss.detach()))
        examples += len(chunk)
        tokens += int(batch.attention_mask.sum())
        if progress is not None:
            progress(step + 1, losses[-1])
    model.eval()
    return TrainResult(sum(losses) / len(losses), len(losses), examples, tokens,
                       time.perf_counter() - start)


def _chunks(records: list, size: int) -> Iterator[list]:
    for i in range(0, len(records), size):
        yield records[i:i + size]


def positive_index(task: ClassificationTask, train_cfg: TrainConfig) -> int | None:
    """The class index of `train.positive_label` in a binary task, else None."""
    if not (train_cfg.positive_label and len(task.labels) == 2):
        return None
    pos = task.index.get(train_cfg.positive_label)
    if pos is None:
        raise ValueError(f"train.positive_label: got {train_cfg.positive_label!r}, "
                         f"expected one of {', '.join(task.labels)}")
    return pos


def predict(task: ClassificationTask, probs: torch.Tensor, train_cfg: TrainConfig) -> list[int]:
    """Argmax, or for a binary task with a named positive class, its probability threshold."""
    pos = positive_index(task, train_cfg)
    if pos is not None:
        return [pos if p[pos] >= train_cfg.threshold else 1 - pos for p in probs.tolist()]
    return probs.argmax(dim=1).tolist()


@torch.no_grad()
def evaluate(model, task, records: list, train_cfg: TrainConfig, model_cfg: ModelConfig, *,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Accuracy figures (classification) or loss/perplexity (instruction) on `records`;
    `progress(done, total)` after each batch (a server's evaluation can take minutes)."""
    model.eval()
    if not records:
        # The same figures as a scored set, at zero: a client without evaluation records
        # (e.g. a Dirichlet split) must reply with the keys the others send, or Flower
        # refuses the round's replies as inconsistent; its weight, 0 examples, drops it.
        if isinstance(task, ClassificationTask):
            return {**metrics.classification_report([], [], task.labels), metrics.LOSS: 0.0}
        return metrics.language_model_report(0.0, 0, 0)
    total_loss, total_tokens, y_true, y_pred, positive_scores = 0.0, 0, [], [], []
    pos = positive_index(task, train_cfg) if isinstance(task, ClassificationTask) else None
    done = 0
    for chunk in _chunks(records, train_cfg.eval_batch_size):
        if progress is not None and done:
            progress(done, len(records))
        done += len(chunk)
        batch: Batch = task.encode(chunk)
        with autocast(model_cfg):
            if isinstance(task, ClassificationTask):
                logits = task.logits(model, batch)
                total_loss += float(torch.nn.functional.cross_entropy(
                    logits, batch.targets, reduction="sum"))
                total_tokens += len(chunk)
                y_true += batch.targets.tolist()
                probs = logits.softmax(dim=1)
                y_pred += predict(task, probs, train_cfg)
                if pos is not None:
                    positive_scores += probs[:, pos].tolist()
            else:
                counts = task.token_counts(batch)
                total_loss += float((task.per_example_loss(model, batch) * counts).sum())
                total_tokens += int(counts.sum())
    if isinstance(task, ClassificationTask):
        report = metrics.classification_report(y_true, y_pred, task.labels)
        report[metrics.LOSS] = total_loss / max(total_tokens, 1)
        if pos is not None:  # a binary task with a class that matters: how well it is ranked
            report.update(metrics.ranking_report([int(t == pos) for t in y_true], positive_scores,
                                                 precision=train_cfg.target_precision))
        return report
    return metrics.language_model_report(total_loss, total_tokens, len(records))
