"""DP-SGD on the trainable (LoRA) parameters with Opacus, for one round.

Opacus' `GradSampleModule` hooks compute each example's gradient on the LoRA
``nn.Linear`` layers; its `DPOptimizer` clips each one to `max_grad_norm`,
sums, adds Gaussian noise and divides by the *expected* batch size. Batches
are Poisson samples (each record joins each step with probability
`sample_rate`), the sampling the accountant assumes, so a batch may be empty:
that step still adds noise and still counts.

The hooks are attached for the round and removed after it, because the model
is shared by every simulated client of a worker process. Only a loss computed
through the model's forward pass on the batch reaches the parameters: the
per-sample gradients are read off the layers' activations, so a term outside
it (a proximal or EWC penalty, a function of the weights alone) would be
dropped by the DP optimizer (opacus#249). The loss is the batch mean of
`task.per_example_loss`, or `batch_loss` when a continual method brings its own
(Avalanche's LwF adds its distillation term, itself a batch mean of
per-example terms, so each example's clipped gradient covers both).

Batches and noise come from the operating system's secure randomness, not
from the run seed: the server knows the run seed and could otherwise
replay the noise and subtract it. The Poisson draws are made on the CPU; the
noise is drawn on the parameters' device (`model.device`), by a generator of
its own seeded from the same secret seed (`noise_generator`).

On a GPU with ``model.compute_dtype = "float16"`` the loss is scaled against
underflow and each micro-batch's per-sample gradients divided back before
Opacus clips them; an overflow recomputes the micro-batch at half the scale
(`fedcl.accelerator.unscale_grad_samples`), so what is released is unchanged.
With ``model.gradient_checkpointing`` the layers recompute their activations
reentrantly, under which the per-sample hooks give the same gradients.

A logical batch larger than ``train.micro_batch_size`` runs as micro-batches
(as Opacus' BatchMemoryManager does): after each but the last, the optimizer
clips that micro-batch's per-example gradients and adds them to its running
sum without noise or update (`signal_skip_step`); the last one closes the
logical step with one draw of noise and one update. The released gradient is
the same as in one piece, and the ledger counts one step per logical batch.
"""

from __future__ import annotations

import secrets
import time
from typing import Callable, Iterator, Sequence

import torch

from fedcl import accelerator
from fedcl.config import ModelConfig, TrainConfig
from fedcl.optim import build_optimizer
from fedcl.privacy.accounting import DPPlan
from fedcl.train import TrainResult, autocast, trainable_parameters


def secure_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def noise_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator Opacus draws the noise with, on `device` (where the gradients are).

    Seeded from `generator`'s (secret) seed without drawing from it, so the
    Poisson batches drawn from `generator` are the same whichever device the
    noise comes from.
    """
    return torch.Generator(device=device).manual_seed((generator.initial_seed() + 1) % 2**63)


def poisson_batches(num_records: int, sample_rate: float, steps: int,
                    generator: torch.Generator) -> Iterator[list[int]]:
    """`steps` index lists, each record in each with probability `sample_rate`."""
    for _ in range(steps):
        mask = torch.rand(num_records, generator=generator) < sample_rate
        yield mask.nonzero().flatten().tolist()


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    """`indices` cut into runs of at most `size` (0: one run)."""
    if size <= 0 or size >= len(indices):
        return [list(indices)]
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def _empty_grad_samples(params: list[torch.nn.Parameter]) -> None:
    # An empty Poisson batch: zero per-sample gradients, so the optimizer adds
    # noise alone, as the accountant assumes every step does.
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def dp_step(optimizer, *after_noise: Callable[[], None]):
    """One Opacus `DPOptimizer` step with `after_noise` callbacks between noise and update.

    Equivalent to ``optimizer.step()`` when no callback is given; e.g.
    ``dp_step(opt, lambda: acc.add(model), lambda: ewc.add_penalty_gradient(model))``
    records the released gradient, then adds the EWC gradient to it.
    """
    if not optimizer.pre_step():  # skipped step (virtual batches): nothing released
        return None
    for callback in after_noise:
        callback()
    return optimizer.original_optimizer.step()


def train_private(model, task, records: list, train_cfg: TrainConfig, model_cfg: ModelConfig,
                  plan: DPPlan, *, generator: torch.Generator | None = None,
                  make_optimizer: Callable[[list], torch.optim.Optimizer] | None = None,
                  progress: Callable[[int, float], None] | None = None,
                  after_noise: Sequence[Callable[[], None]] = (),
                  batch_loss: Callable[[torch.nn.Module, object], torch.Tensor] | None = None) -> TrainResult:
    """Run `plan.steps_per_round` DP-AdamW steps on `records` (plan from `plan_for`).

    `make_optimizer(params)` replaces AdamW (tests use plain SGD to read the
    privatised gradient off the update). `after_noise` callbacks run after each
    step's noise, before the update (see the module docstring).
    `batch_loss(model, batch)`, when given, replaces the mean per-example loss:
    it must be a mean over the batch of terms each depending on one example only.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    if not records:
        raise ValueError("cannot train on an empty set of records")
    generator = generator or secure_generator()
    params = trainable_parameters(model)
    # loss_reduction "mean" in both: the hooks undo the batch mean to get true
    # per-example gradients; the optimizer divides the noisy sum by the
    # expected batch size (not the actual one, which would leak it).
    gsm = GradSampleModule(model, loss_reduction="mean", strict=True)
    inner = (make_optimizer(params) if make_optimizer is not None else
             build_optimizer(params, train_cfg))
    optimizer = DPOptimizer(inner, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                            expected_batch_size=plan.expected_batch_size, loss_reduction="mean",
                            generator=noise_generator(generator, params[0].device))
    model.train()
    start, losses, examples, tokens = time.perf_counter(), [], 0, 0
    scaling = accelerator.needs_loss_scaling(model_cfg)
    scale = accelerator.DP_INITIAL_SCALE if scaling else 1.0

    def backward(chunk: list[int]) -> float:
        """Forward and backward one micro-batch; its summed loss (the per-sample gradients are hooked)."""
        nonlocal tokens, scale
        batch = task.encode([records[i] for i in chunk])
        while True:
            with autocast(model_cfg):
                loss = (batch_loss(model, batch) if batch_loss is not None
                        else task.per_example_loss(model, batch).mean())
            (loss * scale if scaling else loss).backward()
            if not scaling or accelerator.unscale_grad_samples(params, scale):
                break
            if scale <= 1.0:
                raise FloatingPointError("DP-SGD: per-sample gradients are not finite even without loss "
                                         "scaling; lower train.lr or use model.compute_dtype = bfloat16")
            scale /= 2  # float16 overflowed: the same micro-batch again, at half the scale
        tokens += int(batch.attention_mask.sum())
        return float(loss.detach()) * len(chunk)

    try:
        batches = poisson_batches(len(records), plan.sample_rate, plan.steps_per_round, generator)
        for step, indices in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            if indices:
                chunks = micro_batches(indices, train_cfg.micro_batch_size)
                total = 0.0
                for chunk in chunks[:-1]:  # clipped and summed, no noise, no update
                    total += backward(chunk)
                    optimizer.signal_skip_step(do_skip=True)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)  # keeps the running sum
                total += backward(chunks[-1])
                losses.append(total / len(indices))
            else:
                _empty_grad_samples(params)
            dp_step(optimizer, *after_noise)
            examples += len(indices)
            if progress is not None:
                progress(step + 1, losses[-1] if losses else float("nan"))
    finally:
        optimizer.zero_grad(set_to_none=True)
        gsm._close()  # remove hooks and per-sample attributes: the model is shared
        model.eval()
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return TrainResult(mean_loss, plan.steps_per_round, examples, tokens, time.perf_counter() - start)
