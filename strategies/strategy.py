"""The one fedcl strategy: a Flower `Strategy` composed of parts around an inner Flower strategy.

`FedclStrategy` holds

- ``inner``: a Flower strategy (FedAvg, FedProx, FedAdam, ..., or flora's
  stacking) that does the aggregation math on float32 absolute adapter states.
  It is told the run's round, not Flower's count since a resume, which
  FedAdam's bias correction needs;
- ``book`` (`strategies.rounds.RoundBook`): run round numbers, sampling from
  the run seed, and one record per round for the ServerApp;
- ``screen`` (`strategies.screening.ReplyScreen`): the wire format down, the
  checks up, and the decoding of admitted replies;
- ``importance`` (`strategies.importance.FederatedImportance`), optional: the
  federation's task importance, when the run asks for it;
- ``weighting`` (`strategies.weighting.Weighting`): what each train and
  evaluation reply weighs (``strategy.weighting``; equal under client-level DP);
- ``client_dp`` (`strategies.dp.ClientLevelDP`), optional: clip, noise;
- ``inner_state``, optional: what of the inner strategy's state (moments,
  momentum) a resumed run needs, for `state_dict`/`load_state_dict`.

Each kind of strategy is a named subclass with no body (its name is the
``kind`` its saved state is checked against: ``LoraFedAdam``, ...), and its
builder assembles the parts with `compose`. Flower's own `Strategy.start` runs
the rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log

from fedcl import keys
from fedcl.federation.messages import reply_metrics
from fedcl.privacy.accounting import ClientDPPlan
from fedcl.strategies.dp import ClientLevelDP
from fedcl.strategies.importance import FederatedImportance
from fedcl.strategies.rounds import RoundBook, bytes_sent
from fedcl.strategies.screening import (ReplyScreen, check_agreement, check_metrics, client_label,
                                        metric_keys, number, project_metrics)
from fedcl.strategies.weighting import Weighting


class InnerState(Protocol):
    """The part of an inner strategy's state a resume needs (strategies/fedopt.py)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def after_aggregate(self, arrays: ArrayRecord | None) -> ArrayRecord | None: ...


class FedclStrategy(Strategy):
    """Screen, weigh, aggregate (inner strategy), record: see the module docstring."""

    def __init__(self, inner: FedAvg, *, book: RoundBook, screen: ReplyScreen, weighting: Weighting,
                 importance: FederatedImportance | None = None, client_dp: ClientLevelDP | None = None,
                 inner_state: InnerState | None = None) -> None:
        self.inner = inner
        self.book = book
        self.screen = screen
        self.weighting = weighting
        self.importance = importance
        self.client_dp = client_dp
        self.inner_state = inner_state

    # -- what the ServerApp and the tests read -------------------------------------------
    @property
    def kind(self) -> str:
        return type(self).__name__

    @property
    def records(self) -> dict[int, dict]:
        """Run round -> its record, until the ServerApp pops it."""
        return self.book.records

    def record(self, server_round: int) -> dict:
        return self.book.record(server_round)

    def set_round_config(self, round_config: Callable[[int], dict]) -> None:
        """`round_config(run_round)` adds entries (e.g. the continual task) to every round's ConfigRecord."""
        self.book.round_config = round_config

    @property
    def current_global(self) -> dict | None:
        """The float32 global adapter of the last train round."""
        return self.screen.current_global

    @property
    def shared_importance(self) -> dict | None:
        return None if self.importance is None else self.importance.shared

    @shared_importance.setter
    def shared_importance(self, value: dict | None) -> None:
        if self.importance is None:
            raise ValueError("shared_importance: continual.federated_importance is off in this run")
        self.importance.shared = value

    @property
    def dp_plan(self) -> ClientDPPlan | None:
        return None if self.client_dp is None else self.client_dp.plan

    # -- Flower's Strategy interface -------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> fedcl: transport %s | clients per round %s | min replies %d | round offset %d"
            " | federated importance %s | client-level DP %s", self.screen.transport,
            self.book.clients_per_round or "all", self.book.min_replies, self.book.round_offset,
            "off" if self.importance is None else "on", "off" if self.client_dp is None else "on")
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rec = self.book.record(server_round)
        # Round wall time starts here; the ServerApp closes it after its evaluation.
        rec[keys.STARTED_AT] = time.time()
        # The inner strategy addresses every node once enough are connected; the book picks this round's.
        offered = list(self.inner.configure_train(self.book.run_round(server_round), arrays, config, grid))
        chosen = set(self.book.sample(grid.get_node_ids(), server_round))
        messages = [m for m in offered if m.metadata.dst_node_id in chosen]
        self.book.stamp(messages, server_round)
        contents = self._encode(messages, train=True)
        if self.importance is not None:
            self.importance.attach(contents)
        rec[keys.BYTES_DOWN] += bytes_sent(messages)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rec = self.book.record(server_round)
        usable, entries = self._screen(rec, replies, task=self.book.round_task(server_round))
        if self.client_dp is not None:
            for msg in usable:
                self.client_dp.clip(msg, self.screen.start(), rec)
        # Client-level DP weighs equally: a weight above 1 would let one client exceed the clip.
        self.weighting.apply(usable, rec, entries=entries, equal=self.client_dp is not None)
        arrays, metrics = None, None
        if self.book.enough(rec, usable):
            # The run's round, not Flower's count since a resume: FedAdam's bias correction uses it.
            arrays, metrics = self.inner.aggregate_train(self.book.run_round(server_round), usable)
        if self.inner_state is not None:
            arrays = self.inner_state.after_aggregate(arrays)
        if self.client_dp is not None:
            arrays = self.client_dp.release(arrays, rec)
        if self.importance is not None:
            self.importance.aggregate(rec)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        run_round = self.book.run_round(server_round)
        messages = list(self.inner.configure_evaluate(run_round, arrays, config, grid))
        self.book.stamp(messages, server_round)
        self._encode(messages, train=False)
        self.book.record(server_round)[keys.BYTES_DOWN_EVAL] = bytes_sent(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        # In node-id order, as train replies: the averages' float sums do not depend on arrival.
        answered = sorted((r for r in replies if not r.has_error()), key=lambda r: r.metadata.src_node_id)
        rec = self.book.record(server_round)
        # A bad evaluation reply is left out of the average, never allowed to stop the run.
        admitted = []
        for msg in answered:
            reason = check_metrics(msg.content.metric_records)
            if reason is not None:
                self.book.reject_evaluation(rec, msg, reason)
            else:
                admitted.append(msg)
        admitted, kept = self._agreeing(admitted, lambda msg, why: self.book.reject_evaluation(rec, msg, why))
        for msg in admitted:
            project_metrics(msg, kept)
        self.book.note_evaluation(rec, answered, admitted)
        self.weighting.apply(admitted, rec, evaluation=True)
        weight = sum(number(reply_metrics(r), keys.NUM_EXAMPLES_MSG) for r in admitted)
        # No client holds evaluation records (e.g. data.eval_fraction = 0): nothing to average.
        if not admitted or not weight > 0:
            return None
        result = self.inner.aggregate_evaluate(self.book.run_round(server_round), admitted)
        if result is not None:
            rec[keys.FEDERATED_EVAL] = {k: v for k, v in result.items() if k != keys.PARTITION_ID}
        return result

    # -- state beyond the global adapter ---------------------------------------------------
    def state_dict(self) -> dict:
        state = {"kind": self.kind, **self.screen.state_dict()}
        if self.importance is not None:
            state.update(self.importance.state_dict())
        if self.inner_state is not None:
            state.update(self.inner_state.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"strategy state is for {state.get('kind')!r}, this run uses {self.kind!r}")
        self.screen.load_state_dict(state)
        if self.importance is not None:
            self.importance.load_state_dict(state)
        if self.inner_state is not None:
            self.inner_state.load_state_dict(state)

    # -- steps of the rounds ---------------------------------------------------------------
    def _encode(self, messages: list[Message], *, train: bool) -> list[RecordDict]:
        """Put the global into its wire form before the bytes are counted; return the contents."""
        # Flower sends one shared RecordDict to all nodes: encode each content once.
        contents = list({id(m.content): m.content for m in messages}.values())
        for content in contents:
            self.screen.encode_global(content, train=train)
        return contents

    def _screen(self, rec: dict, replies: Iterable[Message], *,
                task: int | None) -> tuple[list[Message], list[dict]]:
        """The replies fit to aggregate, each holding its float32 absolute state (the rest are
        counted in `rec`), and their client entries; `task`: the continual task the round
        trains (None: none)."""
        taken = self.book.take_replies(rec, replies)
        entries = {id(msg): entry for msg, entry in taken}
        agreeing, kept = self._agreeing([msg for msg, _ in taken], lambda msg, reason: self.book.reject(
            rec, entries[id(msg)], client_label(msg), reason))
        usable = []
        for msg in agreeing:
            # taken off before anything else: Flower aggregates exactly one ArrayRecord per reply
            importance = msg.content.array_records.get(keys.IMPORTANCE)
            if importance is not None:
                del msg.content[keys.IMPORTANCE]
            reason = self.screen.admit(msg, task=task)
            if reason is not None:
                self.book.reject(rec, entries[id(msg)], client_label(msg), reason)
                continue
            if self.importance is not None and importance is not None:
                self.importance.take(msg, importance, self.screen.template(), rec)
            project_metrics(msg, kept)
            usable.append(msg)
        # In node-id order: the aggregate's float sums then do not depend on arrival order.
        usable.sort(key=lambda m: m.metadata.src_node_id)
        return usable, [entries[id(m)] for m in usable]

    @staticmethod
    def _agreeing(replies: list[Message],
                  reject: Callable[[Message, str], None]) -> tuple[list[Message], frozenset[str]]:
        """The replies whose metric keys agree (`check_agreement`) and the keys the inner strategy
        is to aggregate (`project_metrics`); `reject(msg, reason)` is called for the others."""
        kept, reasons = check_agreement([metric_keys(msg) for msg in replies])
        agreeing = []
        for msg, reason in zip(replies, reasons):
            if reason is not None:
                reject(msg, reason)
            else:
                agreeing.append(msg)
        return agreeing, kept


def flower_kwargs(config) -> dict:
    """Arguments every inner Flower strategy takes.

    Sampling is the RoundBook's (from the run seed); Flower is only asked to
    wait for `federation.min_replies` connected nodes, so a dead node never
    blocks sampling, and a round goes on while that many reply.
    """
    fed = config.federation
    return dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=fed.min_replies,
                min_evaluate_nodes=fed.min_replies, min_available_nodes=fed.min_replies,
                weighted_by_key=keys.NUM_EXAMPLES_MSG, arrayrecord_key=keys.ARRAYS,
                configrecord_key=keys.CONFIG)


def compose(kind: type[FedclStrategy], inner: FedAvg, config, *, round_offset: int,
            reply_template: dict | None, inner_state: InnerState | None = None,
            client_dp: ClientLevelDP | None = None, updates_from_template: bool = False) -> FedclStrategy:
    """A strategy of `kind` around `inner`, with the parts `config` asks for."""
    fed, strat = config.federation, config.strategy
    book = RoundBook(seed=config.train.seed, clients_per_round=fed.clients_per_round,
                     round_offset=round_offset, min_replies=fed.min_replies)
    screen = ReplyScreen(transport=strat.transport, reply_template=reply_template,
                         max_update_norm=strat.max_update_norm, max_examples=strat.max_examples,
                         updates_from_template=updates_from_template)
    # federated importance is an option of the aggregation, present only when the run asks for it
    wants_importance = config.continual_on and config.continual.federated_importance
    importance = FederatedImportance() if wants_importance else None
    weighting = Weighting(weighting=strat.weighting, cap=strat.weight_cap)
    return kind(inner, book=book, screen=screen, weighting=weighting, importance=importance,
                client_dp=client_dp, inner_state=inner_state)
