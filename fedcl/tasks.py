"""The two task kinds, as plain PyTorch: how records become batches and losses.

Classification uses the language model's own next-token scores for one label
word per class (a verbalizer head). It keeps the model a plain causal LM: the
adapter is the only thing that trains and travels, Opacus sees only LoRA's
``nn.Linear`` layers, and label words learn far faster than a fresh linear
head on a small model. A label's word is the label itself unless
`data.label_words` maps it ("0:no, 1:yes"); labels whose words start with the
same token get tokens of their own (`label_token_ids`). Records and reports keep
the labels; only the scored token changes. Instruction tuning is a causal-LM
loss on the answer tokens only.

Long texts are cut by characters before tokenising (`_encode_end`), keeping the
end the template keeps: the start of a classification text or an answer, the
end of an instruction prompt. The tokens equal those of the whole text, cut.

Both kinds left-pad their batches so that the last position is the one that
predicts; rotary position embeddings are relative, so the padding offset does
not change what the model computes.

How a batch goes through the transformer is the task's `body`: by default the
whole decoder (`WholeDecoder`); with `lora.top_layers` the session plugs in
`fedcl.frozen.FrozenBottom`, which attaches each record's cached hidden states
in `encode` and runs only the top layers in the losses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch
import torch.nn.functional as F

from fedcl.config import DataConfig, ModelConfig, TrainConfig


logger = logging.getLogger("fedcl.tasks")


class TaskError(ValueError):
    """The task cannot be set up for this tokenizer or these labels."""


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, left-padded
    attention_mask: torch.Tensor  # (B, T)
    targets: torch.Tensor  # classification: (B,) class index; instruction: (B, T) token ids, -100 ignored
    # Set only by a body that skips frozen layers (fedcl.frozen): the hidden states
    # entering the first trained layer, (B, T, H), zero at padding, and their position ids.
    hidden: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        """The batch with every tensor on `device` (those already there are not copied)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


class Task(Protocol):
    kind: str

    def encode(self, records: list[dict]) -> Batch: ...

    def per_example_loss(self, model, batch: Batch) -> torch.Tensor: ...


class Body(Protocol):
    """How a batch goes through the transformer: `prepare` at encoding, `last_hidden` in a loss
    (`last_token` where a loss reads the last position only)."""

    def prepare(self, batch: Batch) -> Batch: ...

    def last_hidden(self, model, batch: Batch) -> torch.Tensor: ...

    def last_token(self, model, batch: Batch) -> torch.Tensor: ...


def _pad_left(seqs: list[list[int]], pad_id: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id if fill is None else fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def _split_template(template: str, slot: str) -> tuple[str, str]:
    prefix, _, suffix = template.partition(slot)
    return prefix, suffix


def _encode_plain(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


# Truncation by characters before tokenising: a 50 MB record tokenised whole
# took 10.7 GB. No token of these tokenizers spans more characters than this
# on average over a run of tokens; when one does (long runs of one character),
# `_encode_end` sees too few tokens and widens the cut, so the bound is a speed
# choice, not a correctness one. The spare tokens keep the cut, where a word is
# split, away from the tokens that are kept.
CHARS_PER_TOKEN = 32
_SPARE_TOKENS = 8


def _encode_end(tokenizer, text: str, keep: int, *, tail: bool = False) -> list[int]:
    """The first (or with `tail` the last) `keep` tokens of `text`, as tokenising it whole would give.

    Only a stretch of about (keep + spare) x CHARS_PER_TOKEN characters at that
    end is tokenised, so memory and time are bounded by `keep`, not the text.
    """
    def end(ids: list[int]) -> list[int]:
        return ids[max(0, len(ids) - keep):] if tail else ids[:keep]

    limit = (keep + _SPARE_TOKENS) * CHARS_PER_TOKEN
    while len(text) > limit:
        ids = _encode_plain(tokenizer, text[-limit:] if tail else text[:limit])
        if len(ids) >= keep + _SPARE_TOKENS:
            return end(ids)
        limit *= 4
    return end(_encode_plain(tokenizer, text))


def _bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []


def decoder_and_head(model):
    """The transformer body and the output embedding of a (PEFT-wrapped) causal LM."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.get_decoder(), lm.get_output_embeddings()


class WholeDecoder:
    """The default body: every layer runs on every batch."""

    def prepare(self, batch: Batch) -> Batch:
        return batch

    def last_hidden(self, model, batch: Batch) -> torch.Tensor:
        """(B, T, H) final-norm hidden states of the decoder."""
        decoder, _ = decoder_and_head(model)
        # No key/value cache: nothing is generated, and a cache would hold every layer's
        # keys and values until the forward ends (fedcl.plan counts none).
        return decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       use_cache=False).last_hidden_state

    def last_token(self, model, batch: Batch) -> torch.Tensor:
        """(B, H) final-norm hidden state at the last position (batches are left-padded)."""
        return self.last_hidden(model, batch)[:, -1, :]


def _candidates(tokenizer, word: str) -> list[int]:
    """Tokens that could stand for `word`: those of " word", then of "word", each once, in order."""
    seen: list[int] = []
    for ids in (_encode_plain(tokenizer, " " + word.strip()), _encode_plain(tokenizer, word.strip())):
        seen += [t for t in ids if t not in seen]
    return seen


_warned: set[tuple] = set()  # a process builds a task per config; one warning each is enough


def label_token_ids(tokenizer, labels: list[str], words: list[str]) -> list[int]:
    """The token each class is scored by: the first of " word", unless that clashes with another's.

    Labels whose first tokens clash (" 0" and " 1" both start with the space
    token here; "Credit card" and "Credit reporting" with " Credit") each take
    the first of their own tokens that no other label shares ("0", " card"),
    then any one not yet taken; a warning names the choice. Deterministic: the
    same labels, words and tokenizer give the same tokens in every process.
    """
    cands = [_candidates(tokenizer, word) for word in words]
    for label, found in zip(labels, cands):
        if not found:
            raise TaskError(f"label {label!r} encodes to no tokens; give it a word with data.label_words")
    firsts = [found[0] for found in cands]
    clashing = [i for i, t in enumerate(firsts) if firsts.count(t) > 1]
    if not clashing:
        return firsts
    chosen = {i: t for i, t in enumerate(firsts) if i not in clashing}
    among = [t for i in clashing for t in set(cands[i])]
    shared = {t for t in among if among.count(t) > 1}
    for distinctive in (True, False):  # a token of its own first, then any free one
        for i in clashing:
            taken = set(chosen.values())
            pick = next((t for t in cands[i] if t not in taken and not (distinctive and t in shared)), None)
            if i not in chosen and pick is not None:
                chosen[i] = pick
    unresolved = [labels[i] for i in clashing if i not in chosen]
    if unresolved:
        raise TaskError(f"labels {', '.join(map(repr, unresolved))} have no token of their own the verbalizer "
                        'could score them by; give each a distinct word with data.label_words (e.g. "0:no, 1:yes")')
    key = (id(tokenizer), tuple(labels), tuple(words))
    if key not in _warned:
        _warned.add(key)
        choice = ", ".join(f"{labels[i]!r} -> {tokenizer.decode([chosen[i]])!r}" for i in clashing)
        logger.warning("labels %s start with the same token, so each is scored by a token of its own: %s; "
                       'data.label_words (e.g. "0:no, 1:yes") chooses words instead',
                       ", ".join(repr(labels[i]) for i in clashing), choice)
    return [chosen[i] for i in range(len(labels))]


class ClassificationTask:
    """Verbalizer classification: class k scores one token of its label word (`label_token_ids`)."""

    kind = "classification"

    def __init__(self, tokenizer, labels: list[str], data: DataConfig, model: ModelConfig,
                 train: TrainConfig):
        if len(labels) < 2:
            raise TaskError(f"classification needs at least 2 labels, got {labels!r}")
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.max_length = model.max_length
        self.label_smoothing = train.label_smoothing
        from fedcl.demo_data import classification_template

        self.prefix, self.suffix = _split_template(classification_template(data), "{text}")
        self.prefix_ids = _bos(tokenizer) + _encode_plain(tokenizer, self.prefix)
        self.suffix_ids = _encode_plain(tokenizer, self.suffix)
        self.label_token_ids = self._label_tokens(data.label_word_map())
        room = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if room < 4:
            raise TaskError(
                f"model.max_length={self.max_length} leaves {room} tokens for the text after the "
                "prompt template; raise model.max_length or shorten data.classification_template"
            )
        self.text_room = room
        # Subtracted from the label scores (data.calibrate); set by the session.
        self.offset: torch.Tensor | None = None
        # Replaced by the session with fedcl.frozen.FrozenBottom under lora.top_layers.
        self.body: Body = WholeDecoder()
        # Where `encode` puts its batches: the session sets the model's device (model.device).
        self.device = torch.device("cpu")

    def fingerprint(self) -> dict:
        """What decides a record's tokens and targets: a cache of its hidden states keys on it."""
        return {"kind": self.kind, "prefix": self.prefix_ids, "suffix": self.suffix_ids,
                "max_length": self.max_length, "labels": self.labels}

    def _label_tokens(self, words: dict[str, str]) -> list[int]:
        unknown = [label for label in words if label not in self.index]
        if unknown:
            raise TaskError(f"data.label_words names {', '.join(map(repr, unknown))}, not among the "
                            f"labels ({', '.join(self.labels)})")
        return label_token_ids(self.tokenizer, self.labels, [words.get(label, label) for label in self.labels])

    def encode(self, records: list[dict]) -> Batch:
        seqs, targets = [], []
        for record in records:
            text_ids = _encode_end(self.tokenizer, record["text"], self.text_room)
            seqs.append(self.prefix_ids + text_ids + self.suffix_ids)
            label = record["label"]
            if label not in self.index:
                raise TaskError(f"unknown label {label!r}; known labels: {', '.join(self.labels)}")
            targets.append(self.index[label])
        ids, mask = _pad_left(seqs, self.tokenizer.pad_token_id)
        return self.body.prepare(Batch(ids, mask, torch.tensor(targets, dtype=torch.long)).to(self.device))

    def scores(self, model, batch: Batch) -> torch.Tensor:
        """(B, num_labels) raw scores: the last hidden state against each label word's embedding.

        Only the label rows of the output embedding are used, which avoids
        computing the full vocabulary projection at every position.
        """
        _, head = decoder_and_head(model)
        last = self.body.last_token(model, batch)
        rows = head.weight[self.label_token_ids]
        return (last @ rows.to(last.dtype).T).float()

    def logits(self, model, batch: Batch) -> torch.Tensor:
        """(B, num_labels) scores, less the calibration offset when one is set."""
        scores = self.scores(model, batch)
        return scores if self.offset is None else scores - self.offset.to(scores.device)

    def content_free_scores(self, model) -> torch.Tensor:
        """(num_labels,) raw scores of the template with an empty text: the model's label prior."""
        with torch.no_grad():
            return self.scores(model, self.encode([{"text": "", "label": self.labels[0]}]))[0]

    def per_example_loss(self, model, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), batch.targets,
                               label_smoothing=self.label_smoothing, reduction="none")


class InstructionTask:
    """Causal-LM tuning on prompt/response pairs, loss on the response tokens only."""

    kind = "instruction"

    def __init__(self, tokenizer, data: DataConfig, model: ModelConfig):
        self.tokenizer = tokenizer
        self.max_length = model.max_length
        self.prefix, self.suffix = _split_template(data.instruction_template, "{prompt}")
        self.eos = tokenizer.eos_token_id
        self.body: Body = WholeDecoder()
        self.device = torch.device("cpu")  # where `encode` puts its batches (set by the session)

    def fingerprint(self) -> dict:
        """What decides a record's tokens and targets: a cache of its hidden states keys on it."""
        return {"kind": self.kind, "prefix": self.prefix, "suffix": self.suffix,
                "max_length": self.max_length, "eos": self.eos}

    def _sequence(self, record: dict) -> tuple[list[int], list[int]]:
        # The prompt keeps its end (the template's "### Response:" cue), the answer its
        # start; neither is tokenised past what max_length can hold.
        prompt = _bos(self.tokenizer) + _encode_end(
            self.tokenizer, self.prefix + record["prompt"] + self.suffix, self.max_length, tail=True)
        answer = _encode_end(self.tokenizer, record["response"], self.max_length)
        if self.eos is not None:
            answer = answer + [self.eos]
        answer = answer[: max(1, self.max_length // 2)] if len(prompt) + len(answer) > self.max_length else answer
        prompt = prompt[-(self.max_length - len(answer)):] if len(prompt) + len(answer) > self.max_length else prompt
        return prompt, answer

    def encode(self, records: list[dict]) -> Batch:
        seqs, label_seqs = [], []
        for record in records:
            prompt, answer = self._sequence(record)
            seqs.append(prompt + answer)
            label_seqs.append([-100] * len(prompt) + answer)
        ids, mask = _pad_left(seqs, self.tokenizer.pad_token_id)
        targets, _ = _pad_left(label_seqs, -100, fill=-100)
        return self.body.prepare(Batch(ids, mask, targets).to(self.device))

    def per_example_loss(self, model, batch: Batch) -> torch.Tensor:
        """Mean next-token loss over each example's answer tokens."""
        _, head = decoder_and_head(model)
        hidden = self.body.last_hidden(model, batch)
        logits = head(hidden[:, :-1, :]).float()
        targets = batch.targets[:, 1:]
        token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        counts = (targets != -100).sum(dim=1).clamp(min=1)
        return token_loss.sum(dim=1) / counts

    def token_counts(self, batch: Batch) -> torch.Tensor:
        return (batch.targets[:, 1:] != -100).sum(dim=1)


def make_task(kind: str, tokenizer, labels: list[str], data: DataConfig, model: ModelConfig,
              train: TrainConfig):
    if kind == "classification":
        return ClassificationTask(tokenizer, labels, data, model, train)
    return InstructionTask(tokenizer, data, model)
