"""A run's memory and time plan, from its config alone: `fedcl plan` and the pre-flight.

    plan = plan_run(config)            # nothing is loaded: shapes come from configs
    print(format_plan(plan))           # the figures, and warnings when it will not fit

The model's shape comes from `fedcl.shapes` (published configs such as
DeepSeek's, counted analytically), from a built-in tiny model's config, or
from a local folder's config.json; weights are never read. Every figure is
a formula of the shape and the config (README, "Memory and time plan"):

- weights: all base parameters x the base dtype's bytes (float32 on the CPU),
  plus the LoRA factors in float32;
- gradients and optimiser: the LoRA factors' float32 gradient, and AdamW's
  two float32 moments of them;
- activations: what autograd keeps for the backward pass, per token and
  trained layer (`activation_elements`, counted for a padded batch: key and
  value repeated per query head, SDPA's float mask), x tokens per pass x 4
  bytes, over the trained layers only, plus the boolean padding mask (B x T x
  T bytes): with `lora.top_layers = k` the frozen layers below run without
  gradients (or not at all, from the frozen cache) and keep nothing;
  `model.gradient_checkpointing` keeps one hidden state per layer and one
  layer's full set;
- transient: what lives beside them at the step's peak (`transient_elements`):
  the top layer's MLP temporaries at the forward's end, or its MLP gradients
  in the backward (training runs the decoder with no key/value cache);
- per-sample gradients (DP-SGD): rows per pass x LoRA parameters x 4 bytes,
  rows being `train.micro_batch_size` when set, else the batch;
- frozen states (`lora.top_layers`): T x hidden x 4 bytes per training
  record, counted when `data.max_records` bounds a client's records;
- on the CPU, allocator (glibc's heap keeps about one more working set:
  activations + transient + per-sample) and runtime (a measured constant);
- FLOPs per step: 2 x active layer parameters x tokens for the forward pass
  plus attention's 2 x T x (query-key + value widths) per token, and as much
  again backward (input gradients through frozen weights), plus 4 x LoRA
  parameters x tokens for the LoRA weight gradients.

The thread choice (`thread_plan`) lives here too, since `fedcl plan` shows it
and every process takes its count from it (`fedcl.session.configure_threads`).
Plain PyTorch/transformers; no flwr import.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

from fedcl import models, shapes
from fedcl.config import Config, split_list
from fedcl.shapes import activation_elements, transient_elements

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_LORA_BYTES = 4  # LoRA factors, their gradients and AdamW's moments stay float32
# A CPU training process's pages outside the heap that its first step touches (torch's
# kernels' code and data, autograd's thread): RSS growth less glibc's heap and mapped
# chunks (mallinfo2), 17.5-19.6 MB over the tiny models with and without DP
# (`python -m bench.plan --heap`). A constant of this build, not of the model.
RUNTIME_BYTES = 18_000_000
# On the CPU glibc's heap does not serve a step from the memory the last one freed
# alone: its high-water mark was 1.42-2.01 x the step's live peak (median 1.61) over
# 7 cases (mallinfo2 after every op, `python -m bench.plan --heap`), varying from run
# to run by up to a third for the same settings. The plan adds the median's share.
ALLOCATOR_SHARE = 0.6
GLIBC_MMAP_MAX = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: larger blocks are always mapped


# -- threads -----------------------------------------------------------------
@dataclass(frozen=True)
class ThreadPlan:
    """Torch threads per process of one run, so that its processes share the cores."""

    cores: int
    concurrent: int  # client processes training at once (the engine's CPU slots, at most the sampled)
    client: int
    server: int
    set_by_user: bool

    @property
    def total(self) -> int:
        return self.concurrent * self.client + self.server

    def describe(self) -> str:
        how = "set" if self.set_by_user else "auto"
        over = f"; {self.total} threads on {self.cores} cores: oversubscribed" if self.total > max(
            self.cores, self.concurrent + 1) else ""
        return (f"threads ({how}): {self.concurrent} client process(es) x {self.client} + server "
                f"{self.server} on {self.cores} cores{over}")


def thread_plan(config: Config, cores: int | None = None) -> ThreadPlan:
    """Threads per client and for the server: together at most the cores.

    The engine runs up to cores // federation.client_cpus clients at once (at
    most the sampled ones), and the server may evaluate while they train, so
    the server counts as one more process. A client gets at most its
    client_cpus and at most cores // (clients at once + 1); the server gets
    what the clients leave; every process at least 1. Under contention more
    threads than cores collapse (a two-thread step ran 13x slower than a
    one-thread step next to one busy process). `model.threads` and
    `federation.server_threads` replace the automatic counts.
    """
    cores = max(1, cores or os.cpu_count() or 1)
    fed = config.federation
    client_cpus = min(fed.client_cpus, cores)
    concurrent = max(1, min(fed.sampled, cores // client_cpus))
    client = config.model.threads or max(1, min(client_cpus, cores // (concurrent + 1)))
    server_set = getattr(fed, "server_threads", 0)
    server = server_set or max(1, cores - concurrent * client)
    return ThreadPlan(cores, concurrent, client, server, bool(config.model.threads or server_set))


# -- the model's shape -------------------------------------------------------
def model_shape(config: Config):
    """The transformers config of `model.name` (cut to `model.layers`), from no weights, and its label."""
    name = config.model.name
    if name in shapes.SHAPES:
        shape_cfg, label = shapes.shape_config(name), shapes.SHAPES[name].description
    elif name in models.BUILTIN_MODELS and name.startswith("tiny-"):
        shape_cfg, label = models.tiny_config(name), models.BUILTIN_MODELS[name]
    else:
        shape_cfg, label = _folder_config(name), name
    if config.model.layers:
        if config.model.layers > shape_cfg.num_hidden_layers:
            raise models.ModelError(f"model.layers: got {config.model.layers}, this model has "
                                    f"{shape_cfg.num_hidden_layers} layers (0 keeps all)")
        shape_cfg = copy.deepcopy(shape_cfg)
        shape_cfg.num_hidden_layers = config.model.layers
    return shape_cfg, label


def _folder_config(name: str):
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        from fedcl import gguf_cache

        folder = gguf_cache.converted_folder(path)
        if not gguf_cache.is_converted(folder):
            raise shapes.ShapeError(f"model.name: {name!r} is a GGUF file not converted yet; its shape is "
                                    "read from the conversion, which the first run makes")
        path = folder
    if not (path / "config.json").is_file():
        raise shapes.ShapeError(
            f"model.name: got {name!r}; the plan knows the shapes {', '.join(shapes.SHAPES)}, the built-in "
            f"models {', '.join(models.BUILTIN_MODELS)}, or a local folder with a config.json")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def lora_modules(shape_cfg, target_modules: str, index: int) -> list[shapes.Linear]:
    """Layer `index`'s Linear modules LoRA wraps for `lora.target_modules` (as `models.lora_targets`)."""
    linears = [lin for lin in shapes.layer_linears(shape_cfg, index) if lin.wrappable]
    if target_modules == "auto":
        wanted = models.LORA_TARGETS.get(shape_cfg.model_type, [])
    else:
        wanted = split_list(target_modules)
    return [lin for lin in linears if any(lin.name == t or lin.name.endswith("." + t) for t in wanted)]


# -- the plan ------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    model: str
    description: str
    model_type: str
    layers: int
    trained_layers: int
    params: int
    active_params: int
    trainable: int
    tokens_per_pass: int
    dp: bool
    memory: dict[str, int]  # bytes one training client process holds, by part
    server_bytes: int  # the server's process: weights and adapter (evaluation keeps no activations)
    flops_per_step: float
    device: str
    available: int | None  # bytes free on the device, None when unknown
    threads: ThreadPlan
    concurrent: int = 1  # clients training at once on this device
    warnings: tuple[str, ...] = field(default=())

    @property
    def client_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def needed(self) -> int:
        """Bytes on the device for the clients that train at once and the server."""
        return self.concurrent * self.client_bytes + self.server_bytes


def _device(config: Config) -> str:
    spec = getattr(config.model, "device", "cpu")
    if spec == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def device_memory(device: str) -> int | None:
    """Bytes free on `device` now: MemAvailable for the CPU, torch's free memory for CUDA."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = int(device.partition(":")[2] or torch.cuda.current_device())
        return int(torch.cuda.mem_get_info(index)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def plan_run(config: Config, *, available: int | None = None, cores: int | None = None) -> Plan:
    """The memory and FLOPs of one training step of `config` and the thread choice (see module docstring).

    `available` replaces the device's free memory (tests, what-if questions).
    """
    shape_cfg, label = model_shape(config)
    count = shapes.count_params(shape_cfg)
    layers = shape_cfg.num_hidden_layers
    top = config.lora.top_layers
    if top > layers:
        raise models.ModelError(f"lora.top_layers: got {top}, this model has {layers} layers "
                                f"(after model.layers); expected 0 (all) or 1..{layers}")
    trained = list(range(layers - top, layers)) if top else list(range(layers))
    r = config.lora.r
    lora = {i: lora_modules(shape_cfg, config.lora.target_modules, i) for i in trained}
    if not any(lora.values()):
        raise models.ModelError(f"lora.target_modules: {config.lora.target_modules!r} matches no Linear "
                                f"module of a {shape_cfg.model_type} layer; available: "
                                + ", ".join(lin.name for lin in shapes.layer_linears(shape_cfg, layers - 1)))
    trainable = sum(lin.count * r * (lin.in_features + lin.out_features) for mods in lora.values() for lin in mods)
    dp = config.privacy.enabled and config.privacy.mode == "sample"
    rows = config.train.batch_size
    if dp and config.train.micro_batch_size:
        rows = min(rows, config.train.micro_batch_size)
    seq = config.model.max_length
    tokens = rows * seq
    device = _device(config)
    base_dtype = config.model.compute_dtype if device.startswith("cuda") else "float32"
    checkpointing = getattr(config.model, "gradient_checkpointing", False)
    # A classification score reads the last position: the top layer runs its keys and values
    # for every token and the rest for the last token of each row (fedcl.frozen.last_token).
    last_token = (bool(top) and top < layers and config.data.task == "classification" and not checkpointing
                  and shape_cfg.model_type in models.LAST_TOKEN_ARCHITECTURES)
    kept = _kept_elements(shape_cfg, lora, r, seq, checkpointing=checkpointing, dp=dp)
    if last_token:
        whole_top = activation_elements(shape_cfg, trained[-1], lora[trained[-1]], r, seq)
        key_value = shapes.key_value_elements(shape_cfg, lora[trained[-1]], r, input_grad=len(trained) > 1)
        kept -= whole_top - key_value  # per token; the rest comes back once a row below

    head = 0
    if config.data.task == "instruction":
        # Full-vocabulary logits, their log-softmax and its gradient: at most three
        # B x T x vocab float32 tensors at once (tiny-llama, 8 x 48: 2.5 measured).
        head = 3 * tokens * shape_cfg.vocab_size * 4
    weights = count.total * BYTES[base_dtype]
    activations = kept * tokens * 4 + tokens * seq + head  # + the boolean padding mask, once
    transient = transient_elements(shape_cfg, trained[-1]) * tokens * 4
    if last_token:
        activations += (whole_top - key_value) * rows * 4
        # the peak's MLP backward is the layer below's (its whole width), or the top's keys and values
        transient = max(transient_elements(shape_cfg, trained[-2]) * tokens if len(trained) > 1
                        else key_value * tokens, transient_elements(shape_cfg, trained[-1]) * rows) * 4
    per_sample = (rows + 1) * trainable * _LORA_BYTES if dp else 0
    memory = {
        "weights": weights,
        "adapter": trainable * _LORA_BYTES,
        "gradients": trainable * _LORA_BYTES,
        "optimizer": 2 * trainable * _LORA_BYTES,
        "activations": activations,
        "transient": transient,
        # DP-SGD: one gradient per row, and the clipped sum the noise is added to
        "per_sample": per_sample,
    }
    if top:  # the frozen bottom's output, kept per training record
        memory["frozen_states"] = _frozen_records(config) * seq * shape_cfg.hidden_size * 4
    if device == "cpu":
        # glibc's heap keeps what a step frees, fragmented by the small tensors that
        # outlive a step (AdamW's state, gradients): see ALLOCATOR_SHARE. A tensor above
        # glibc's largest mmap threshold gets its own mapping, returned when freed: the
        # vocabulary head's (tiny-llama, 8 x 48: no heap growth for its 194 MB tensors).
        # Not on CUDA, whose caching allocator reuses its blocks.
        on_heap = activations - (head if head // 3 > GLIBC_MMAP_MAX else 0)
        memory["allocator"] = int(ALLOCATOR_SHARE * (on_heap + transient + per_sample))
        memory["runtime"] = RUNTIME_BYTES
    flops = _flops(shape_cfg, count, trained, seq, tokens, trainable, config, last_token=last_token)
    threads = thread_plan(config, cores)
    free = device_memory(device) if available is None else available
    concurrent = threads.concurrent
    if device.startswith("cuda"):  # Ray packs 1 / client_gpus clients onto one GPU
        share = getattr(config.federation, "client_gpus", 1.0)
        concurrent = max(1, min(concurrent, int(1 / share + 1e-9)))
    plan = Plan(config.model.name, label, shape_cfg.model_type, layers, len(trained), count.total,
                count.active, trainable, tokens, dp, memory, weights + trainable * _LORA_BYTES, flops,
                device, free, threads, concurrent=concurrent)
    return _with_warnings(plan, config)


def _kept_elements(shape_cfg, lora: dict[int, list[shapes.Linear]], r: int, seq: int, *,
                   checkpointing: bool, dp: bool) -> int:
    """Elements kept per token over the trained layers (`lora`: their LoRA modules by layer index)."""
    per_token = [activation_elements(shape_cfg, i, mods, r, seq) for i, mods in lora.items()]
    if not checkpointing:
        return sum(per_token)
    # Each layer keeps its input, the layer being recomputed its full set; under DP
    # Opacus also keeps every LoRA module's input for the per-sample gradients.
    inputs = sum(activation_elements(shape_cfg, i, mods, r, seq) - activation_elements(shape_cfg, i, [], r, seq)
                 for i, mods in lora.items()) if dp else 0
    return len(lora) * shape_cfg.hidden_size + inputs + max(per_token)


def _frozen_records(config: Config) -> int:
    """Training records a client holds at most, when `data.max_records` caps them (else 0: unknown)."""
    return -(-config.data.max_records // config.federation.clients) if config.data.max_records else 0


def _flops(shape_cfg, count, trained: list[int], seq: int, tokens: int, trainable: int, config: Config, *,
           last_token: bool = False) -> float:
    h, heads = shape_cfg.hidden_size, shape_cfg.num_attention_heads
    if shape_cfg.model_type in ("llama", "qwen2"):
        width = 2 * heads * (getattr(shape_cfg, "head_dim", None) or h // heads)
    else:
        width = heads * (shape_cfg.qk_nope_head_dim + shape_cfg.qk_rope_head_dim + shape_cfg.v_head_dim)
    per_layer = {i: 2 * count.layers_active[i] + 2 * seq * width for i in trained}
    forward = sum(per_layer.values()) * tokens
    if last_token:  # the top layer: keys and values for every token, the rest for one token a row
        top, rows = trained[-1], tokens // seq
        key_value = 2 * shapes.key_value_params(shape_cfg, top)
        forward -= per_layer[top] * tokens - key_value * tokens - (per_layer[top] - key_value) * rows
    passes = 3 if getattr(config.model, "gradient_checkpointing", False) else 2  # forward, backward(, again)
    flops = passes * forward + 6 * trainable * tokens
    if config.data.task == "instruction":
        flops += 4 * h * shape_cfg.vocab_size * tokens
    return float(flops)


def _with_warnings(plan: Plan, config: Config) -> Plan:
    warnings = []
    if plan.available is not None and plan.needed > plan.available:
        warnings.append(
            f"{plan.device} cannot hold this run: it needs {_size(plan.needed)} ({plan.concurrent} "
            f"client(s) at once x {_size(plan.client_bytes)} + server {_size(plan.server_bytes)}), "
            f"{_size(plan.available)} is free; lower train.batch_size or model.max_length, set "
            "lora.top_layers, train.micro_batch_size (DP) or model.gradient_checkpointing, or run fewer "
            "clients at once (federation.client_cpus)")
    elif plan.available is None:
        warnings.append(f"free memory of {plan.device} unknown: not checked")
    if plan.threads.total > max(plan.threads.cores, plan.threads.concurrent + 1):
        warnings.append(f"{plan.threads.total} torch threads on {plan.threads.cores} cores: "
                        "model.threads / federation.server_threads oversubscribe the machine")
    return Plan(**{**plan.__dict__, "warnings": tuple(warnings)})


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(plan: Plan, config: Config) -> str:
    """The plan as the lines `fedcl plan` prints."""
    active = f" ({_count(plan.active_params)} active per token)" if plan.active_params != plan.params else ""
    trained = f"top {plan.trained_layers} of {plan.layers}" if plan.trained_layers < plan.layers \
        else f"all {plan.layers}"
    lines = [
        f"model       {plan.model}: {plan.description} [{plan.model_type}]",
        f"parameters  {_count(plan.params)}{active}; LoRA r={config.lora.r} on "
        f"{config.lora.target_modules} in {trained} layers: {_count(plan.trainable)} trainable",
        f"step        {config.train.batch_size} x {config.model.max_length} tokens"
        + (f", passes of {plan.tokens_per_pass // config.model.max_length} rows" if plan.dp else "")
        + f", DP {'on' if plan.dp else 'off'}, {plan.device}",
    ]
    lines += [f"  {part:<14}{_size(size):>12}" for part, size in plan.memory.items()]
    if plan.memory.get("frozen_states") == 0:
        per_record = config.model.max_length * model_shape(config)[0].hidden_size * 4
        lines.append(f"  frozen states not counted: {_size(per_record)} per training record "
                     "(data.max_records bounds them)")
    lines += [f"  {'= client':<14}{_size(plan.client_bytes):>12}  per training process",
              f"  {'server':<14}{_size(plan.server_bytes):>12}",
              f"  {'device':<14}{_size(plan.needed):>12}  needed ({plan.concurrent} client(s) at once "
              f"+ server); free: {_size(plan.available) if plan.available is not None else 'unknown'}",
              f"flops/step  {_count(plan.flops_per_step)}FLOP",
              plan.threads.describe()]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def summary_line(plan: Plan) -> str:
    """The plan in one line, for a run's pre-flight (`fedcl plan` prints the whole of it)."""
    return (f"plan: {plan.model} | client {_size(plan.client_bytes)} (activations "
            f"{_size(plan.memory['activations'])}, per-sample {_size(plan.memory['per_sample'])}) | "
            f"{plan.device} needs {_size(plan.needed)}, free "
            f"{_size(plan.available) if plan.available is not None else 'unknown'} | "
            f"{_count(plan.flops_per_step)}FLOP/step | {plan.threads.describe()}")
