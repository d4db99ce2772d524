"""Tests of fedcl.models and fedcl.gguf_cache: tiny models, LoRA, GGUF cache."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedcl import gguf_cache, models
from fedcl.config import LoraConfig, ModelConfig
from fedcl.models import ModelError

pytestmark = pytest.mark.models

REPO = Path(__file__).resolve().parents[1]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name, model_type, automatic LoRA targets, has a mixture of experts
TINY = [
    ("tiny-llama", "llama", QKVO, False),
    ("tiny-qwen2", "qwen2", QKVO, False),
    ("tiny-deepseek-v2", "deepseek_v2", ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"], True),
    ("tiny-deepseek-v3", "deepseek_v3",
     ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"], True),
]
TINY_NAMES = [case[0] for case in TINY]


def _batch(tokenizer, texts=("Hello DeepSeek, how are you?", "LoRA")):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def _checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _start_python(code: str, **env: str) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# Work done in other Python processes: a server and its clients, as it were.
# Each starts with this module (if its test is selected), so the GGUF
# conversion (30-50 s) and the imports overlap the in-process tests.
BACKGROUND = {
    "test_tiny_weights_identical_across_processes": f"""
        import hashlib
        from fedcl import models
        for name in {TINY_NAMES!r}:
            digest = hashlib.sha256()
            for key, tensor in sorted(models.load_base(name)[0].state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().contiguous().numpy().tobytes())
            print(name, digest.hexdigest())
    """,
    "test_smollm2_gguf_converted_once": """
        from fedcl import gguf_cache, models
        print(gguf_cache.ensure_converted(models._smollm2_path()))
    """,
}


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """test name -> (process, its FEDCL_CACHE folder)."""
    selected = {item.originalname for item in request.session.items}
    started = {}
    for name, code in BACKGROUND.items():
        if name in selected:
            cache = tmp_path_factory.mktemp("fedcl-cache")
            started[name] = (_start_python(code, FEDCL_CACHE=str(cache)), cache)
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _finish(background, name: str) -> tuple[str, str, Path]:
    proc, cache = background[name]
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out, err, cache


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail a test whose process tries to connect anywhere (a model hub, say)."""
    import socket

    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"test tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse(None, host))
    yield
    assert not attempts, f"network access attempted: {attempts}"


# -- tiny models -----------------------------------------------------------
def test_builtin_names():
    assert set(models.BUILTIN_MODELS) == {
        "smollm2-135m", "tiny-llama", "tiny-qwen2", "tiny-deepseek-v2", "tiny-deepseek-v3"}
    assert ModelConfig().name == "smollm2-135m"


@pytest.mark.parametrize("name, model_type, targets, moe", TINY)
def test_tiny_model_loads_frozen_float32(name, model_type, targets, moe):
    model, tokenizer = models.load_base(name)
    assert model.config.model_type == model_type
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    assert model.config.vocab_size == len(tokenizer) == 129280  # DeepSeek-V3's vocabulary
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    layers = model.model.layers
    assert len(layers) == 2
    if moe:  # first layer dense, second a mixture of 4 experts plus a shared one
        assert not hasattr(layers[0].mlp, "experts")
        assert layers[1].mlp.experts.gate_up_proj.shape[0] == 4
        assert hasattr(layers[1].mlp, "shared_experts")
    info = models.describe(model)
    assert info["model_type"] == model_type and info["num_layers"] == 2
    assert info["trainable_params"] == 0
    assert info["params"] < 9_000_000  # the embedding once, not twice
    assert models.base_model_bytes(model) == 4 * info["params"]
    assert models.lora_targets(model, "auto") == targets


def test_load_base_gives_fresh_modules_sharing_frozen_weights():
    first, tok1 = models.load_base("tiny-llama")
    second, tok2 = models.load_base("tiny-llama")
    assert first is not second and tok1 is tok2
    w1, w2 = first.model.layers[0].self_attn.q_proj.weight, second.model.layers[0].self_attn.q_proj.weight
    assert w1 is not w2 and w1.data_ptr() == w2.data_ptr()
    assert second.lm_head.weight is second.model.embed_tokens.weight
    peft_model, _ = models.build_lora_model(ModelConfig(name="tiny-llama"), LoraConfig())
    third, _ = models.load_base("tiny-llama")
    assert not any("lora_" in n for n, _ in third.named_modules())
    assert any("lora_" in n for n, _ in peft_model.named_modules())


def test_tiny_weights_identical_across_processes(background, monkeypatch):
    monkeypatch.setattr(models, "_BASE_CACHE", {})  # build here, not from an earlier test
    torch.manual_seed(12345)  # the caller's RNG state must not matter...
    before = torch.get_rng_state()
    local = {name: _checksum(models.load_base(name)[0]) for name in TINY_NAMES}
    assert torch.equal(before, torch.get_rng_state())  # ...nor be changed
    out, _, _ = _finish(background, "test_tiny_weights_identical_across_processes")
    remote = dict(line.split() for line in out.strip().splitlines())
    assert remote == local


# -- LoRA ------------------------------------------------------------------
@pytest.mark.parametrize("name, model_type, targets, moe", TINY)
def test_lora_forward_backward_trains_only_lora(name, model_type, targets, moe):
    model, tokenizer = models.build_lora_model(ModelConfig(name=name), LoraConfig(r=4, alpha=8))
    assert isinstance(model, PeftModel)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    model.train()
    batch = _batch(tokenizer)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # B starts at zero: A only gets gradients from the second step on
        optimizer.zero_grad()
        loss = model(**batch, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert models.describe(model)["trainable_params"] == sum(
        p.numel() for n, p in model.named_parameters() if n in trainable)
    assert models.base_model_bytes(model) == models.base_model_bytes(models.load_base(name)[0])


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_init_is_deterministic_by_seed():
    build = lambda seed: _lora_state(  # noqa: E731
        models.build_lora_model(ModelConfig(name="tiny-deepseek-v3"), LoraConfig(init_seed=seed))[0])
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = build(7)
    assert torch.equal(before, torch.get_rng_state())
    torch.manual_seed(2)  # a different global state gives the same adapter
    second, other = build(7), build(8)
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if "lora_A" in k)


class _Unknown(torch.nn.Module):
    class config:  # noqa: N801 - mimics a transformers config
        model_type = "mystery"

    def __init__(self):
        super().__init__()
        self.block = torch.nn.ModuleDict({"wq": torch.nn.Linear(4, 4), "wo": torch.nn.Linear(4, 4)})


# model, override, expected targets or the error's fragments
TARGET_CASES = [
    ("tiny-llama", "q_proj,v_proj", ["q_proj", "v_proj"], None),
    ("tiny-llama", " o_proj , self_attn.k_proj ", ["o_proj", "self_attn.k_proj"], None),
    ("tiny-deepseek-v3", "kv_b_proj", ["kv_b_proj"], None),
    ("tiny-deepseek-v3", "q_proj", None, ["'q_proj'", "q_a_proj", "kv_b_proj"]),  # MLA with q_lora_rank
    ("tiny-qwen2", "q_proj,wq,wk", None, ["'wq', 'wk'", "available names include", "o_proj"]),
    ("tiny-llama", "layers", None, ["'layers'"]),  # a container, not a Linear
    ("unknown", "auto", None, ["'mystery'", "lora.target_modules", "wq"]),
    ("unknown", "wq", ["wq"], None),
]


@pytest.mark.parametrize("name, override, expected, error", TARGET_CASES)
def test_lora_targets_override(name, override, expected, error):
    model = _Unknown() if name == "unknown" else models.load_base(name)[0]
    if error is None:
        assert models.lora_targets(model, override) == expected
        return
    with pytest.raises(ModelError) as info:
        models.lora_targets(model, override)
    for fragment in error:
        assert fragment in str(info.value)


def test_build_lora_model_uses_override():
    model, _ = models.build_lora_model(ModelConfig(name="tiny-qwen2"), LoraConfig(target_modules="v_proj"))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"v_proj"}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-deepseek-v3"])
def test_peft_save_and_load_round_trip(tmp_path, name):
    model, tokenizer = models.build_lora_model(ModelConfig(name=name), LoraConfig(r=4))
    with torch.no_grad():  # B starts at zero; make the adapter matter
        generator = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
        base_logits = models.load_base(name)[0](**batch).logits
    assert not torch.allclose(expected, base_logits)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    # Generated models have no folder: nothing for PEFT to look up on a hub.
    assert model.peft_config["default"].base_model_name_or_path is None

    restored = PeftModel.from_pretrained(models.load_base(name)[0], tmp_path)
    with torch.no_grad():
        assert torch.allclose(restored(**batch).logits, expected, atol=1e-6)


# -- names and paths -------------------------------------------------------
def _save_tiny(folder: Path, with_tokenizer: bool = True) -> None:
    model, tokenizer = models.load_base("tiny-llama")
    model.save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)


def test_local_folder_round_trip(tmp_path):
    _save_tiny(tmp_path / "tiny")
    original, tok = models.load_base("tiny-llama")
    loaded, loaded_tok = models.load_base(str(tmp_path / "tiny"))
    assert loaded.config.model_type == "llama" and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token == tok.pad_token
    batch = _batch(tok)
    assert torch.equal(_batch(loaded_tok)["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, original(**batch).logits, atol=1e-6)


def _bad_path(tmp_path: Path, kind: str) -> str:
    if kind == "missing-gguf":
        return str(tmp_path / "nope.gguf")
    if kind == "corrupt-gguf":
        (tmp_path / "junk.gguf").write_bytes(b"not a gguf file" * 10)
        return str(tmp_path / "junk.gguf")
    if kind == "empty-folder":
        (tmp_path / "empty").mkdir()
        return str(tmp_path / "empty")
    if kind == "no-tokenizer":
        _save_tiny(tmp_path / "notok", with_tokenizer=False)
        return str(tmp_path / "notok")
    if kind == "other-file":
        (tmp_path / "weights.bin").write_bytes(b"\0")
        return str(tmp_path / "weights.bin")
    return kind


# name or kind of path, fragments of the error message
BAD_NAMES = [
    ("no-such-model", ["'no-such-model'", "smollm2-135m", "tiny-deepseek-v3", ".gguf", "config.json"]),
    ("deepseek-ai/DeepSeek-V3", ["'deepseek-ai/DeepSeek-V3'", "never downloaded"]),
    ("missing-gguf", ["nope.gguf", "not found"]),
    ("corrupt-gguf", ["junk.gguf", "could not convert"]),
    ("empty-folder", ["empty", "no config.json"]),
    ("no-tokenizer", ["notok", "no tokenizer", "save_pretrained"]),
    ("other-file", ["weights.bin", "a local Hugging Face folder"]),
]


@pytest.mark.parametrize("kind, fragments", BAD_NAMES)
def test_bad_model_names(tmp_path, monkeypatch, kind, fragments):
    monkeypatch.setenv("FEDCL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError) as info:
        models.load_base(_bad_path(tmp_path, kind))
    for fragment in fragments:
        assert fragment in str(info.value)
    left = [p for p in (tmp_path / "cache").glob("models/*") if not p.name.endswith(".lock")]
    assert not left  # no half folder


# -- GGUF cache ------------------------------------------------------------
def _fake_convert(source: Path, out: Path) -> None:
    (out / "config.json").write_text("{}")


def _fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF fake")
    return path


def test_conversion_failure_leaves_nothing_trusted(tmp_path):
    source, root = _fake_gguf(tmp_path), tmp_path / "cache"

    def broken(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")  # half written, then killed
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        gguf_cache.ensure_converted(source, root, convert=broken)
    target = gguf_cache.converted_folder(source, root)
    assert not target.exists() and not list(target.parent.glob(".*.tmp-*"))
    # A hard kill leaves a temporary folder, and a folder without the marker
    # (a hand copy, say) is not trusted either: both are redone.
    (target.parent / f".{target.name}.tmp-999-dead").mkdir()
    target.mkdir()
    assert gguf_cache.ensure_converted(source, root, convert=_fake_convert) == target
    assert gguf_cache.is_converted(target) and (target / "config.json").is_file()
    assert not list(target.parent.glob(".*.tmp-*"))


def test_conversion_race_loser_uses_winner(tmp_path):
    source, root = _fake_gguf(tmp_path), tmp_path / "cache"
    target = gguf_cache.converted_folder(source, root)

    def slow_loser(src: Path, out: Path) -> None:  # another process wins meanwhile
        target.mkdir()
        (target / "winner").write_text("")
        (target / gguf_cache.MARKER).write_text("{}")
        _fake_convert(src, out)

    assert gguf_cache.ensure_converted(source, root, convert=slow_loser) == target
    assert (target / "winner").is_file()
    assert not list(target.parent.glob(".*.tmp-*"))


def test_two_processes_convert_once(tmp_path):
    source = _fake_gguf(tmp_path)
    code = f"""
        import time
        from pathlib import Path
        from fedcl import gguf_cache
        def convert(src, out):
            time.sleep(1.0)
            (out / "config.json").write_text("{{}}")
        print(gguf_cache.ensure_converted({str(source)!r}, convert=convert))
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEDCL_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert len({out.strip() for out, _ in outputs}) == 1
    assert sum("converting" in err for _, err in outputs) == 1
    assert gguf_cache.is_converted(Path(outputs[0][0].strip()))


def test_smollm2_gguf_converted_once(background, monkeypatch, capfd):
    out, err, root = _finish(background, "test_smollm2_gguf_converted_once")
    assert err.count("converting SmolLM2-135M-Instruct.Q4_1.gguf") == 1
    folder = Path(out.strip().splitlines()[-1])
    monkeypatch.setenv("FEDCL_CACHE", str(root))
    assert folder.parent == root / "models" and folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert gguf_cache.is_converted(folder) and (folder / "config.json").is_file()
    assert not list(folder.parent.glob(".*.tmp-*"))
    stamp = (folder.stat().st_mtime_ns, (folder / gguf_cache.MARKER).stat().st_mtime_ns)

    def must_not_run(src: Path, out: Path) -> None:
        raise AssertionError("converted again")

    capfd.readouterr()
    assert gguf_cache.ensure_converted(models._smollm2_path(), convert=must_not_run) == folder
    monkeypatch.setattr(gguf_cache, "convert_gguf", must_not_run)
    monkeypatch.setattr(models, "_BASE_CACHE", {})
    model, tokenizer = models.load_base("smollm2-135m")
    assert "converting" not in capfd.readouterr().err
    assert stamp == (folder.stat().st_mtime_ns, (folder / gguf_cache.MARKER).stat().st_mtime_ns)

    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    assert models.lora_targets(model, "auto") == QKVO
    # The dequantised weights still know things.
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_model_layers_keeps_the_first_layers_and_refuses_too_many():
    from fedcl.config import LoraConfig, ModelConfig
    from fedcl.models import ModelError, build_lora_model, describe, load_base

    full, _ = load_base("tiny-llama")
    cut, _ = build_lora_model(ModelConfig(name="tiny-llama", layers=1), LoraConfig())
    assert describe(cut)["num_layers"] == 1 and len(cut.get_base_model().get_decoder().layers) == 1
    assert all(".layers.0." in n for n, p in cut.named_parameters() if p.requires_grad)
    # the kept layer is the base's own first layer (same weights), and the model still runs
    kept = cut.get_base_model().get_decoder().layers[0].mlp.down_proj.weight
    assert torch.equal(kept, full.get_decoder().layers[0].mlp.down_proj.weight)
    out = cut(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert out.shape[:2] == (1, 3) and torch.isfinite(out).all()
    assert len(load_base("tiny-llama")[0].get_decoder().layers) == 2  # the cached base is untouched
    with pytest.raises(ModelError, match="model.layers: got 5, this model has 2 layers"):
        build_lora_model(ModelConfig(name="tiny-llama", layers=5), LoraConfig())
