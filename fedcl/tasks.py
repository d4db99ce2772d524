"""The two task kinds, as plain PyTorch: how records become batches and losses.

Classification uses the language model's own next-token scores for one label
word per class (a verbalizer head). It keeps the model a plain causal LM: the
adapter is the only thing that trains and travels, Opacus sees only LoRA's
``nn.Linear`` layers, and label words learn far faster than a fresh linear
head on a small model. Instruction tuning is a causal-LM loss on the answer
tokens only.

Both kinds left-pad their batches so that the last position is the one that
predicts; rotary position embeddings are relative, so the padding offset does
not change what the model computes.

How a batch goes through the transformer is the task's `body`: by default the
whole decoder (`WholeDecoder`); with `lora.top_layers` the session plugs in
`fedcl.frozen.FrozenBottom`, which attaches each record's cached hidden states
in `encode` and runs only the top layers in the losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from fedcl.config import DataConfig, ModelConfig, TrainConfig


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


class Task(Protocol):
    kind: str

    def encode(self, records: list[dict]) -> Batch: ...

    def per_example_loss(self, model, batch: Batch) -> torch.Tensor: ...


class Body(Protocol):
    """How a batch goes through the transformer: `prepare` at encoding, `last_hidden` in a loss."""

    def prepare(self, batch: Batch) -> Batch: ...

    def last_hidden(self, model, batch: Batch) -> torch.Tensor: ...


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
        return decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


class ClassificationTask:
    """Verbalizer classification: class k scores the first token of its label word."""

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
        self.label_token_ids = self._label_tokens()
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

    def fingerprint(self) -> dict:
        """What decides a record's tokens and targets: a cache of its hidden states keys on it."""
        return {"kind": self.kind, "prefix": self.prefix_ids, "suffix": self.suffix_ids,
                "max_length": self.max_length, "labels": self.labels}

    def _label_tokens(self) -> list[int]:
        ids = []
        for label in self.labels:
            tokens = _encode_plain(self.tokenizer, " " + label.strip())
            if not tokens:
                raise TaskError(f"label {label!r} encodes to no tokens")
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            clashes = [lab for lab, t in zip(self.labels, ids) if ids.count(t) > 1]
            raise TaskError(
                f"labels {clashes} start with the same token, so the verbalizer cannot tell them "
                "apart; rename the labels (e.g. with data.labels and distinct words)"
            )
        return ids

    def encode(self, records: list[dict]) -> Batch:
        seqs, targets = [], []
        for record in records:
            text_ids = _encode_plain(self.tokenizer, record["text"])[: self.text_room]
            seqs.append(self.prefix_ids + text_ids + self.suffix_ids)
            label = record["label"]
            if label not in self.index:
                raise TaskError(f"unknown label {label!r}; known labels: {', '.join(self.labels)}")
            targets.append(self.index[label])
        ids, mask = _pad_left(seqs, self.tokenizer.pad_token_id)
        return self.body.prepare(Batch(ids, mask, torch.tensor(targets, dtype=torch.long)))

    def scores(self, model, batch: Batch) -> torch.Tensor:
        """(B, num_labels) raw scores: the last hidden state against each label word's embedding.

        Only the label rows of the output embedding are used, which avoids
        computing the full vocabulary projection at every position.
        """
        _, head = decoder_and_head(model)
        last = self.body.last_hidden(model, batch)[:, -1, :]
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

    def fingerprint(self) -> dict:
        """What decides a record's tokens and targets: a cache of its hidden states keys on it."""
        return {"kind": self.kind, "prefix": self.prefix, "suffix": self.suffix,
                "max_length": self.max_length, "eos": self.eos}

    def _sequence(self, record: dict) -> tuple[list[int], list[int]]:
        prompt = _bos(self.tokenizer) + _encode_plain(
            self.tokenizer, self.prefix + record["prompt"] + self.suffix)
        answer = _encode_plain(self.tokenizer, record["response"])
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
        return self.body.prepare(Batch(ids, mask, targets))

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
