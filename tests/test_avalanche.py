"""Avalanche's plugin strategies inside a client's training (continual/avalanche_bridge.py), on the real tiny model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("avalanche", reason="avalanche-lib is installed by `make install`")

from fedcl.continual import metrics as clm  # noqa: E402
from fedcl.continual.avalanche_bridge import AvalancheMethod, avalanche_transfer  # noqa: E402
from fedcl.continual.catalog import make_method  # noqa: E402
from fedcl.adapters import adapter_state, load_adapter_state  # noqa: E402
from fedcl.config import ConfigError, ContinualConfig, TrainConfig, load_config  # noqa: E402
from fedcl.train import train_local  # noqa: E402

pytestmark = pytest.mark.continual

TRAIN = TrainConfig(lr=5e-3, local_steps=3, batch_size=4, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def tiny():
    from fedcl.models import build_lora_model
    from fedcl.tasks import make_task

    config = load_config(None, ["model.name=tiny-llama", "model.max_length=32"])
    model, tokenizer = build_lora_model(config.model, config.lora)
    task = make_task("classification", tokenizer, ["no", "yes"], config.data, config.model, config.train)
    with torch.no_grad():  # a non-zero start, so every factor gets gradients from step 1
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, task, config.model, adapter_state(model)


def records(n, start=0, flip=False):
    # Long enough to be cut at model.max_length: every sequence has the same length, so
    # no padding and batching cannot differ between the two loops.
    return [{"text": f"review {i} " + ("great " if (i % 2) != flip else "awful ") * 40,
             "label": "yes" if (i % 2) != flip else "no", "meta": {}} for i in range(start, start + n)]


def method(name, **cfg):
    return AvalancheMethod(name, ContinualConfig(strategy=f"avalanche:{name}", **cfg), TRAIN)


def train_round(model, task, model_cfg, start, m, data, seed=7, train=TRAIN):
    load_adapter_state(model, start)
    result = m.train_round(model, task, data, train, model_cfg, seed=seed)
    return adapter_state(model), result


def distance(a, b):
    return sum(float((a[n] - b[n]).pow(2).sum()) for n in a) ** 0.5


def test_avalanche_loop_equals_fedcl_loop_before_any_task_ends(tiny):
    # With no finished task, a replay plugin has an empty memory: Avalanche's loop must then
    # take exactly fedcl's steps (same batches, AdamW, clipping).
    model, task, model_cfg, start = tiny
    data = records(10)
    ours, result = train_round(model, task, model_cfg, start, method("Replay"), data)
    load_adapter_state(model, start)
    plain = train_local(model, task, data, TRAIN, model_cfg, seed=7)
    reference = adapter_state(model)
    assert result.steps == plain.steps == 3 and result.examples == plain.examples == 12
    assert result.loss == pytest.approx(plain.loss, rel=1e-5)
    assert distance(reference, start) > 1e-3  # it trained
    for name in reference:
        assert torch.allclose(ours[name], reference[name], atol=1e-6), name


@pytest.mark.parametrize("name", ["EWC", "MAS"])
def test_importance_penalty_holds_the_adapter_near_the_last_task(tiny, name):
    model, task, model_cfg, start = tiny
    strong = {"ewc_strength": 1e6} if name == "EWC" else {}
    m = method(name, **strong)
    if name == "MAS":
        m.plugin._lambda = 1e6  # MAS's strength, set directly: fedcl has no knob for it
    load_adapter_state(model, start)
    m.after_task(model, task, records(8))  # task 0 ends at `start`
    assert m.closed == 1
    # Adam moves every coordinate by about lr per step whatever the gradient's scale, so the
    # penalty shows over many steps: the free run drifts on, the held one stays near the anchor.
    longer = TrainConfig(lr=5e-3, local_steps=20, batch_size=4, max_grad_norm=0.0)
    held, _ = train_round(model, task, model_cfg, start, m, records(8, flip=True), train=longer)
    free, _ = train_round(model, task, model_cfg, start, method(name, **strong), records(8, flip=True),
                          train=longer)
    # Measured where the plugin says it matters: the importance-weighted distance (the penalty).
    importance = m.plugin.importances[0] if name == "EWC" else m.plugin.importance
    importance = {n: d.data for n, d in importance.items()}  # Avalanche's ParamData -> tensors
    weights = {n: importance["model." + n].reshape(start[n].shape) for n in start}
    assert sum(float(w.sum()) for w in weights.values()) > 0

    def weighted(state):
        return sum(float((weights[n] * (state[n] - start[n]).pow(2)).sum()) for n in start)

    assert weighted(held) < 0.5 * weighted(free)


def test_lwf_distils_from_the_model_at_the_task_end(tiny):
    model, task, model_cfg, start = tiny
    m = method("LwF")
    load_adapter_state(model, start)
    m.after_task(model, task, records(8))
    assert m.plugin.lwf.prev_model is not None
    with_teacher, _ = train_round(model, task, model_cfg, start, m, records(8, flip=True))
    without, _ = train_round(model, task, model_cfg, start, method("LwF"), records(8, flip=True))
    assert distance(with_teacher, without) > 1e-4


@pytest.mark.parametrize("name", ["LwF", "AGEM", "Replay"])
def test_state_round_trips_through_the_node_folder(tiny, tmp_path, name):
    model, task, model_cfg, start = tiny
    m = method(name)
    load_adapter_state(model, start)
    m.before_task(1, [])
    m.after_task(model, task, records(8))
    m.save(tmp_path)
    again = method(name)
    again.load(tmp_path)
    assert (again.closed, again.task_index) == (1, 1)
    a, _ = train_round(model, task, model_cfg, start, m, records(8, flip=True))
    b, _ = train_round(model, task, model_cfg, start, again, records(8, flip=True))
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n


def test_our_forgetting_and_bwt_match_avalanches_own_metric_classes():
    R = [[0.8, 0.1, 0.2], [0.9, 0.7, 0.3], [0.6, 0.5, 0.9]]
    figures = avalanche_transfer(R)
    assert figures["forgetting"] == pytest.approx(clm.avalanche_forgetting(R))
    assert figures["bwt"] == pytest.approx(clm.backward_transfer(R))
    # the maximum-based forgetting fedcl reports differs where a task peaked later (task 0)
    assert clm.forgetting(R) > figures["forgetting"]


def test_names_settings_and_dp_are_checked_at_load():
    assert isinstance(make_method(ContinualConfig(strategy="avalanche:LwFPlugin")), AvalancheMethod)
    assert make_method(ContinualConfig(strategy="avalanche:LwF")).name == "avalanche:LwF"
    with pytest.raises(ConfigError, match="avalanche:LwF, avalanche:EWC"):
        ContinualConfig(strategy="avalanche:GEM")
    dp = ["data.task_column=date", "privacy.target_epsilon=8"]
    for name in ("EWC", "SI", "MAS", "AGEM", "Replay"):
        with pytest.raises(ConfigError, match="not accounted for under DP-SGD"):
            load_config(None, dp + [f"continual.strategy=avalanche:{name}"])
    assert load_config(None, dp + ["continual.strategy=avalanche:LwF"]).privacy.enabled
    # client-level DP noises the whole update: any plugin may produce it
    assert load_config(None, dp + ["continual.strategy=avalanche:EWC", "privacy.mode=client"]).privacy.enabled


def _sgd_step_under_dp(model, task, data, m, start):
    """One full-batch DP-SGD step (noise 0, no effective clipping, SGD lr 1): minus the released gradient."""
    import math

    from fedcl.privacy.accounting import DPPlan
    from fedcl.privacy.dpsgd import train_private

    plan = DPPlan(noise_multiplier=0.0, sample_rate=1.0, expected_batch_size=len(data), max_grad_norm=1e6,
                  steps_per_round=1, planned_steps=1, delta=1e-5, accountant="rdp", epsilon_cap=math.inf)
    load_adapter_state(model, start)
    train_private(model, task, data, TRAIN, load_config(None, ["model.name=tiny-llama"]).model, plan,
                  make_optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0),
                  batch_loss=lambda mod, batch: m.dp_batch_loss(mod, task, batch))
    return {n: start[n] - v for n, v in adapter_state(model).items()}


@pytest.mark.privacy
def test_lwf_distillation_reaches_the_dp_sgd_update(tiny):
    # Opacus reads per-sample gradients off activations; LwF's term goes through the forward
    # pass, so with noise 0 and a clip bound never reached the released gradient must equal
    # the plain gradient of cross-entropy + distillation, and differ from cross-entropy alone.
    model, task, model_cfg, start = tiny
    data = records(6, flip=True)
    m = method("LwF")
    load_adapter_state(model, start)
    m.after_task_private(model, task)  # teacher: the model at `start`
    assert m.plugin.lwf.prev_classes_by_task[0] == {0, 1}  # every label, not the records' own
    with torch.no_grad():  # move the student away from its teacher, so distillation has a gradient
        moved = {n: v + 0.05 * torch.randn_like(v) for n, v in start.items()}
    released = _sgd_step_under_dp(model, task, data, m, moved)

    def plain_gradient(loss_of):
        load_adapter_state(model, moved)
        model.zero_grad(set_to_none=True)
        model.train()
        loss_of(task.encode(data)).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        return grads

    with_lwf = plain_gradient(lambda batch: m.dp_batch_loss(model, task, batch))
    ce_only = plain_gradient(lambda batch: task.per_example_loss(model, batch).mean())
    assert list(released) == list(with_lwf)
    gap = 0.0
    for name, value in released.items():
        assert torch.allclose(value, with_lwf[name], atol=1e-5, rtol=1e-4), name
        gap += float((with_lwf[name] - ce_only[name]).pow(2).sum())
    assert gap ** 0.5 > 1e-4  # the distillation term is really in it
