"""Frozen bottom layers computed once per record, for `lora.top_layers = k`.

With LoRA in the top k decoder layers only, every layer below is frozen and
gives a record the same hidden states in every epoch and round. `FrozenBottom`
is a task body (`fedcl.tasks.Body`) that computes them once per record (no
grad, under the step's autocast), keeps them in a `StateStore` in the node's
memory, and runs only the top k layers and the final norm per step, for
training and evaluation alike:

    task = make_task(...)
    use_frozen_bottom(task, model, config.model, config.lora)   # no-op for k = 0
    batch = task.encode(records)        # attaches the cached states (B, T, H)
    loss = task.per_example_loss(model, batch)   # top k layers only

The top layers see what they see in the whole model: the same left-padded
batch, the causal + padding mask built by transformers' own mask functions
from the model's config, position ids 0..T-1 over the padded batch and the
rotary embeddings the model's own rotary module makes from them. Only each
record's real tokens are stored; at padding the top layers get zeros, which
no real token attends to, so padding adds nothing to a loss or a (per-sample)
gradient. A record's states come from whichever batch first held it: rotary
embeddings are relative, so its padding offset there changes them only by
float rounding (about 1e-7 relative). The embedding and the bottom layers are
never called inside a loss, so Opacus' per-sample hooks see only the top
layers' LoRA ``nn.Linear`` modules, as they would in the whole model.

A record's key is a hash of its token ids and of everything else its states
depend on: the base model, `model.layers`, the layer count, `lora.top_layers`,
the compute dtype, the attention implementation and the task's template,
labels and `model.max_length`. Nothing here is ever sent anywhere. Memory:
4 x tokens x hidden size bytes per record in float32 (SmolLM2: 147 KB at 64
tokens). Plain PyTorch; no flwr import.

With `lora.frozen_cache = "file"` a node also keeps its own records' states in
its state folder (`CACHE_FILE`), so a restarted process or a later run with
the same settings skips the bottom's forward: `FrozenBottom.attach(folder)`
loads the file once, `flush()` writes it back when new states were computed.
The file carries the fingerprint above and a checksum of its contents; a file
with another fingerprint is not used (the states are rebuilt and the file
replaced), and a damaged one is rebuilt with a warning, never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from pathlib import Path

import torch

from fedcl import atomic

from fedcl import accelerator, models
from fedcl.config import LoraConfig, ModelConfig
from fedcl.tasks import Batch, WholeDecoder, decoder_and_head
from fedcl.train import autocast

logger = logging.getLogger("fedcl.frozen")
CACHE_FILE = "frozen-states.fedcl"
_MAGIC = b"fedcl frozen states v1\n"


def _layer_masks(decoder, like: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, layers: range) -> list:
    """Each layer's attention mask, as the decoder's forward builds it."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = decoder.config
    types = getattr(config, "layer_types", None) or ["full_attention"] * len(decoder.layers)
    makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {kind: makers[kind](config=config, inputs_embeds=like, attention_mask=attention_mask,
                                cache=None, position_ids=position_ids)
             for kind in {types[i] for i in layers}}
    return [masks[types[i]] for i in layers]


def run_layers(decoder, hidden: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, layers: range) -> torch.Tensor:
    """`hidden` (B, T, H) through `decoder.layers[i]` for i in `layers`, as the decoder's forward does.

    Supported decoders (`models.TOP_LAYERS_ARCHITECTURES`) build one mask per
    layer type and one set of rotary embeddings from the embedding output's
    dtype, then call each layer with both; no cache, no final norm here.
    """
    like = hidden.to(decoder.embed_tokens.weight.dtype)  # the embedding output's dtype, as in forward
    masks = _layer_masks(decoder, like, attention_mask, position_ids, layers)
    rotary = decoder.rotary_emb(like, position_ids)
    for i, mask in zip(layers, masks):
        hidden = decoder.layers[i](hidden, attention_mask=mask, position_embeddings=rotary,
                                   position_ids=position_ids, cache=None, use_cache=False)
    return hidden


def _positions(width: int, device) -> torch.Tensor:
    return torch.arange(width, device=device).unsqueeze(0)  # what the decoder uses when given none


class StateStore:
    """Hidden states by record key, in memory; `hits`/`misses` count look-ups."""

    def __init__(self) -> None:
        self._states: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        found = self._states.get(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def peek(self, key: bytes) -> torch.Tensor | None:
        """The states under `key`, not counted as a look-up."""
        return self._states.get(key)

    def put(self, key: bytes, states: torch.Tensor) -> None:
        self._states[key] = states

    def __len__(self) -> int:
        return len(self._states)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._states.values())


class FrozenBottom:
    """A task body that runs layers below `start` once per record and the top ones per step."""

    def __init__(self, model, task, model_cfg: ModelConfig, top_layers: int, *,
                 store: StateStore | None = None):
        decoder, _ = decoder_and_head(model)
        total = len(decoder.layers)
        if not 1 <= top_layers < total:
            raise ValueError(f"lora.top_layers: FrozenBottom needs 1..{total - 1} for a "
                             f"{total}-layer model, got {top_layers}")
        self.decoder = decoder
        self.model_cfg = model_cfg
        self.start = total - top_layers
        self.num_layers = total
        self._check_bottom_frozen()
        self.store = store if store is not None else StateStore()
        self.fingerprint = _fingerprint(decoder, model_cfg, top_layers, task)
        self._file: Path | None = None  # the attached node's cache file
        self._file_keys: set[bytes] = set()  # its records' keys: what the file holds
        self._file_written: set[bytes] = set()
        self._loaded: dict[Path, set[bytes]] = {}  # files read in this process, and their keys

    def attach(self, folder: str | Path) -> None:
        """Keep the states of the records used from now on in `folder`'s cache file.

        A process serving several nodes (simulation) attaches each node's own
        folder before its work: a node's file holds its own records only.
        """
        path = Path(folder) / CACHE_FILE
        if path not in self._loaded:
            found = read_states(path, self.fingerprint)
            for key, states in found.items():
                self.store.put(key, states)
            self._loaded[path] = set(found)
        self._file, self._file_keys = path, set(self._loaded[path])
        self._file_written = set(self._loaded[path])

    def flush(self) -> None:
        """Write the attached file when this node's records gained states since it was read."""
        if self._file is None or self._file_keys <= self._file_written:
            return
        states = {key: self.store.peek(key) for key in self._file_keys}
        write_states(self._file, self.fingerprint, {k: v for k, v in states.items() if v is not None})
        self._loaded[self._file] = set(self._file_keys)
        self._file_written = set(self._file_keys)

    def _check_bottom_frozen(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for i in range(self.start):
            for name, module in self.decoder.layers[i].named_modules():
                trains = any(p.requires_grad for p in module.parameters(recurse=False))
                if isinstance(module, BaseTunerLayer) or trains:
                    raise ValueError(f"lora.top_layers: layer {i} ({name or 'itself'}) is adapted or "
                                     f"trainable, but only layers {self.start}.. may be")

    def key(self, token_ids: torch.Tensor) -> bytes:
        """The store key of one record's real token ids."""
        digest = hashlib.blake2b(self.fingerprint.encode(), digest_size=20)
        digest.update(token_ids.to(torch.int64).cpu().numpy().tobytes())
        return digest.digest()

    def prepare(self, batch: Batch) -> Batch:
        """`batch` with `hidden` (B, T, H) entering layer `start` and `position_ids` (1, T)."""
        # Keys and the padding check read the tokens on the host: one copy off the device.
        ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
        width = ids.shape[1]
        lengths = [int(n) for n in mask.sum(dim=1)]
        for row, n in enumerate(lengths):
            if int(mask[row, width - n:].sum()) != n:
                raise ValueError("FrozenBottom needs left-padded batches (padding first, then tokens)")
        keys = [self.key(ids[row, width - n:]) for row, n in enumerate(lengths)]
        if self._file is not None:
            self._file_keys.update(keys)
        states = [self.store.get(k) for k in keys]
        missing = [row for row, s in enumerate(states) if s is None]
        if missing:
            for row, computed in zip(missing, self._compute(ids[missing], mask[missing],
                                                            [lengths[r] for r in missing])):
                self.store.put(keys[row], computed)
                states[row] = computed
        like = states[0] if states else self.decoder.embed_tokens.weight
        hidden = like.new_zeros((len(states), width, self.decoder.config.hidden_size))
        for row, (n, s) in enumerate(zip(lengths, states)):
            hidden[row, width - n:] = s
        device = self.decoder.embed_tokens.weight.device  # where the layers that read them are
        return dataclasses.replace(batch, hidden=hidden.to(device), position_ids=_positions(width, device))

    @torch.no_grad()
    def _compute(self, ids: torch.Tensor, mask: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
        """Each row's real-token states entering layer `start` (the bottom's one forward per record)."""
        width = max(lengths)
        ids, mask = ids[:, ids.shape[1] - width:], mask[:, mask.shape[1] - width:]  # drop shared padding
        device = self.decoder.embed_tokens.weight.device
        ids, mask = ids.to(device), mask.to(device)
        with autocast(self.model_cfg):
            hidden = run_layers(self.decoder, self.decoder.embed_tokens(ids), mask,
                                _positions(width, device), range(self.start))
        # Kept in host memory whatever the device: a GPU's memory is for the model and batches.
        return [hidden[row, width - n:].to("cpu", copy=True) for row, n in enumerate(lengths)]

    def last_hidden(self, model, batch: Batch) -> torch.Tensor:
        """(B, T, H) final-norm hidden states from the batch's cached states, top layers only."""
        if batch.hidden is None:  # a batch not made by this body's task: run everything
            return WholeDecoder().last_hidden(model, batch)
        decoder, _ = decoder_and_head(model)
        if len(decoder.layers) != self.num_layers:
            raise ValueError(f"lora.top_layers: the cached states are for a {self.num_layers}-layer "
                             f"model, this one has {len(decoder.layers)} layers")
        device = decoder.norm.weight.device
        hidden = batch.hidden.to(device)
        if torch.is_grad_enabled() and accelerator.checkpointing_on(decoder):
            # Reentrant checkpointing passes gradients only into a layer whose input needs them.
            hidden = hidden.detach().requires_grad_(True)
        hidden = run_layers(decoder, hidden, batch.attention_mask.to(device),
                            batch.position_ids.to(device), range(self.start, self.num_layers))
        return decoder.norm(hidden)

    def last_token(self, model, batch: Batch) -> torch.Tensor:
        """(B, H) final-norm hidden state at the last position, as `last_hidden(...)[:, -1]` gives it.

        A classification score reads the last position only, so the top layer
        needs every position's keys and values but nothing else of the positions
        before the last: its query, attention output, MLP and norm run on the last
        token alone (about 1/T of that layer's work, T the batch's width). Where
        that shortcut is not known to hold (an architecture outside
        `models.LAST_TOKEN_ARCHITECTURES`, reentrant checkpointing, a mask that is not a
        tensor) the whole top layer runs.
        """
        if batch.hidden is None:
            return WholeDecoder().last_token(model, batch)
        decoder, _ = decoder_and_head(model)
        top = decoder.layers[-1] if len(decoder.layers) == self.num_layers else None
        if (top is None or getattr(decoder.config, "model_type", None) not in models.LAST_TOKEN_ARCHITECTURES
                or accelerator.checkpointing_on(decoder) or batch.hidden.shape[1] < 2):
            return self.last_hidden(model, batch)[:, -1, :]
        device = decoder.norm.weight.device
        hidden, mask = batch.hidden.to(device), batch.attention_mask.to(device)
        position_ids = batch.position_ids.to(device)
        like = hidden.to(decoder.embed_tokens.weight.dtype)  # as run_layers makes masks and rotary
        (top_mask,) = _layer_masks(decoder, like, mask, position_ids, range(self.num_layers - 1, self.num_layers))
        if top_mask is not None and not (isinstance(top_mask, torch.Tensor) and top_mask.dim() == 4):
            return self.last_hidden(model, batch)[:, -1, :]
        hidden = run_layers(decoder, hidden, mask, position_ids, range(self.start, self.num_layers - 1))
        cos, sin = decoder.rotary_emb(like, position_ids)
        earlier = _EarlierKeys(top, hidden[:, :-1], cos[:, :-1], sin[:, :-1])
        last_mask = None if top_mask is None else top_mask[:, :, -1:, :]
        out = top(hidden[:, -1:], attention_mask=last_mask, position_embeddings=(cos[:, -1:], sin[:, -1:]),
                  position_ids=position_ids[:, -1:], cache=earlier, use_cache=False)
        return decoder.norm(out)[:, -1, :]


class _EarlierKeys:
    """The top layer's keys and values of every position before the last, handed to its
    attention as a read-only cache: `update` puts them in front of the last token's own."""

    def __init__(self, layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        import sys

        attn = layer.self_attn
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own
        normed = layer.input_layernorm(hidden)
        shape = (*normed.shape[:-1], -1, attn.head_dim)
        keys = attn.k_proj(normed).view(shape).transpose(1, 2)
        self.values = attn.v_proj(normed).view(shape).transpose(1, 2)
        _, self.keys = rotate(keys, keys, cos, sin)

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)


def _fingerprint(decoder, model_cfg: ModelConfig, top_layers: int, task) -> str:
    parts = {
        "base": models.base_identity(model_cfg.name), "model.layers": model_cfg.layers,
        "num_layers": len(decoder.layers), "top_layers": top_layers,
        "compute_dtype": model_cfg.compute_dtype, "weights_dtype": str(decoder.embed_tokens.weight.dtype),
        "attention": getattr(decoder.config, "_attn_implementation", None), "task": task.fingerprint(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def use_frozen_bottom(task, model, model_cfg: ModelConfig, lora_cfg: LoraConfig, *,
                      store: StateStore | None = None):
    """Give `task` a `FrozenBottom` body when `lora_cfg.top_layers` leaves layers below; return it.

    With top_layers 0 (LoRA everywhere) or the model's whole depth there is
    nothing frozen to skip, and the task keeps its whole-decoder body.
    """
    decoder, _ = decoder_and_head(model)
    if 0 < lora_cfg.top_layers < len(decoder.layers):
        task.body = FrozenBottom(model, task, model_cfg, lora_cfg.top_layers, store=store)
    return task


def write_states(path: str | Path, fingerprint: str, states: dict[bytes, torch.Tensor]) -> Path:
    """Write `states` (record key -> (tokens, hidden) tensor) to `path` atomically, with a checksum."""
    buffer = io.BytesIO()
    keys = sorted(states)
    torch.save({"fingerprint": fingerprint, "keys": [k.hex() for k in keys],
                "states": [states[k].detach().cpu().contiguous() for k in keys]}, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    return atomic.write_bytes(path, _MAGIC + digest + b"\n" + payload)


def read_states(path: str | Path, fingerprint: str) -> dict[bytes, torch.Tensor]:
    """The states in `path` when it is intact and made under `fingerprint`; otherwise none.

    Absent: nothing to say. Another fingerprint (a changed base, layer count,
    template, max_length...): not reused, said at info level. Damaged (wrong
    header, checksum, or contents): a warning, and the states are rebuilt.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as err:
        logger.warning("frozen-layer cache %s cannot be read (%s); rebuilding the states", path, err)
        return {}
    head, _, payload = blob[len(_MAGIC):].partition(b"\n")
    if not blob.startswith(_MAGIC) or head != hashlib.sha256(payload).hexdigest().encode():
        logger.warning("frozen-layer cache %s is damaged (header or checksum does not match); "
                       "not used, rebuilding the states", path)
        return {}
    try:
        content = torch.load(io.BytesIO(payload), weights_only=True)
        found = _checked_states(content)
    except Exception as err:  # noqa: BLE001 - any unreadable content is a damaged cache
        logger.warning("frozen-layer cache %s has unreadable contents (%s); not used, rebuilding "
                       "the states", path, err)
        return {}
    if content["fingerprint"] != fingerprint:
        logger.info("frozen-layer cache %s was made with other settings (base, layers, template or "
                    "max_length); not reused, rebuilding the states", path)
        return {}
    return found


def _checked_states(content) -> dict[bytes, torch.Tensor]:
    if not isinstance(content, dict) or not isinstance(content.get("fingerprint"), str):
        raise ValueError("no fingerprint")
    keys, states = content.get("keys"), content.get("states")
    if not isinstance(keys, list) or not isinstance(states, list) or len(keys) != len(states):
        raise ValueError("keys and states do not pair up")
    found = {}
    for key, value in zip(keys, states):
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not torch.isfinite(value).all():
            raise ValueError(f"entry {key!r} is not a finite (tokens, hidden) tensor")
        found[bytes.fromhex(key)] = value
    return found
