"""Every name that crosses a process boundary: message keys and metrics.json keys.

Two vocabularies, kept apart on purpose and both named here once:

- What travels in Flower messages (the server's ConfigRecord, a client's reply
  MetricRecord, the RecordDict's record names) uses Flower's kebab-case
  (``num-examples``). The ClientApp writes these and the strategies read them.
- What the run folder's metrics.json holds uses snake_case (``num_examples``).
  The ServerApp and the strategies write it; the reports, the CLI, the tuner
  and the benchmarks read it.

`reply_to_record` is the one translation from the first to the second (a
client's reply becomes its entry under a round's ``clients``). Nothing here
imports Flower.
"""

from __future__ import annotations

# -- message records: names inside a Flower RecordDict --------------------------------
ARRAYS = "arrays"  # the adapter (global down, update up): an ArrayRecord
METRICS = "metrics"  # a client's reply figures: a MetricRecord
CONFIG = "config"  # the server's per-round settings: a ConfigRecord
IMPORTANCE = "importance"  # federated importance (continual): a second ArrayRecord

# -- the server's per-round ConfigRecord ------------------------------------------------
SERVER_ROUND = "server-round"  # the run's round number (resumes continue the count)
TASK = "task"  # the continual task (0-based) the round trains on
TASK_END = "task-end"  # 1 in a task's last round: clients send their importance
IMPORTANCE_TASK = "importance-task"  # which task the shared importance sent down belongs to

# -- a client's reply MetricRecord -------------------------------------------------------
NUM_EXAMPLES_MSG = "num-examples"  # what the aggregation weighs by
PARTITION_ID = "partition-id"
STATUS = "status"  # 0 trained; otherwise it sent no arrays (see the STATUS_* values)
EPSILON = "epsilon"  # sample-level DP: the client's lifetime epsilon after this round
RUN_EPSILON = "run-epsilon"  # sample-level DP: what this run alone has spent (its ledger entries)
EPSILON_NEXT = "epsilon-next"  # a refusal: what this round would have reached
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
TRAIN_EXAMPLES = "train-examples"
TRAIN_TOKENS = "train-tokens"
TRAIN_SECONDS = "train-seconds"
TRAIN_POOL = "train-pool"  # continual: records trained on (share plus replayed)
DATA_SHA256 = "data-sha256"  # a deployed node: which data trained the update
EVAL_SECONDS = "eval-seconds"

STATUS_OK = 0
STATUS_BUDGET_EXHAUSTED = 1  # sample-level DP: the lifetime budget would be passed
STATUS_NO_TASK_DATA = 2  # continual: no records of this task; nothing to aggregate, not a failure

# -- a node's config (Flower's node_config) ----------------------------------------------
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_FILE = "data-file"
NODE_STATE_DIR = "state-dir"
NODE_DEVICE = "device"  # a deployed node's own device, overriding model.device
NODE_WORKER = "worker"  # a deployed node's worker socket (fedcl.client.worker): model kept loaded

# -- metrics.json ------------------------------------------------------------------------
MODEL = "model"  # model facts: name, base_bytes, adapter_bytes
ROUNDS = "rounds"  # one record per committed round
INITIAL_EVAL = "initial_eval"  # the global adapter scored before round 1
PRIVACY = "privacy"  # the run's DP settings and each client's last figures
CONTINUAL = "continual"  # the accuracy matrix and its summaries

# one round's record
ROUND = "round"
EVAL = "eval"  # the server's evaluation of the new global adapter
CLIENTS = "clients"  # one entry per reply (see reply_to_record)
BYTES_DOWN = "bytes_down"
BYTES_UP = "bytes_up"
BYTES_DOWN_EVAL = "bytes_down_eval"
BYTES_UP_EVAL = "bytes_up_eval"
FAILURES = "failures"  # error replies
REJECTED = "rejected"  # replies that failed screening
REJECTED_EVAL = "rejected_eval"  # evaluation replies that failed screening (left out of federated_eval)
REJECTED_EVAL_CLIENTS = "rejected_eval_clients"  # their entries (id, node_id, why); only when there are some
REFUSED = "refused"  # clients that declined to train (privacy budget)
IDLE = "idle"  # clients without records of the round's task
STARTED_AT = "started_at"  # wall clock at configure_train; replaced by ROUND_SECONDS
ROUND_SECONDS = "round_seconds"
SERVER_EVAL_SECONDS = "server_eval_seconds"
CLIENT_EVAL_SECONDS_MAX = "client_eval_seconds_max"
FEDERATED_EVAL = "federated_eval"  # the clients' own evaluations, averaged
CLIENT_DP = "client_dp"  # client-level DP: clipped, averaged, noise, epsilon
ROUND_TASK = "task"  # continual: the task the round trained on
TASK_ACCURACIES = "task_accuracies"  # continual: the matrix row of a task's last round
IMPORTANCE_CLIENTS = "importance_clients"
IMPORTANCE_REJECTED = "importance_rejected"
WEIGHT_CAPPED = "weight_capped"  # train replies whose weight is not their reported count (strategy.weighting)
WEIGHT_CAPPED_EVAL = "weight_capped_eval"  # the same among the evaluation replies

# a round's CLIENT_DP record (client-level DP, strategies/dp.py)
DP_CLIPPED = "clipped"  # updates whose norm exceeded the clip
DP_AVERAGED = "averaged"  # updates averaged: the n of the noise std
DP_NOISE_MULTIPLIER = "noise_multiplier"
DP_CLIP = "clip"
DP_NOISE_STD = "noise_std"  # noise_multiplier * clip / averaged; absent when nothing aggregated
DP_EPSILON = "epsilon"  # client-level epsilon after this round (None without noise)
DP_DELTA = "delta"

# an evaluation report (EVAL, INITIAL_EVAL, FEDERATED_EVAL)
ACCURACY = "accuracy"
MACRO_F1 = "macro_f1"
MAJORITY = "majority_baseline"  # accuracy of always answering the split's most frequent class
PER_CLASS = "per_class"
LOSS = "loss"
PERPLEXITY = "perplexity"
# binary tasks: the positive class's scores, ranked (fedcl.metrics.ranking_report)
ROC_AUC = "roc_auc"
AVERAGE_PRECISION = "average_precision"
RECALL_AT_PRECISION = "recall_at_precision"
THRESHOLD_AT_PRECISION = "threshold_at_precision"
TARGET_PRECISION = "target_precision"
# the server's binary evaluation: a threshold chosen on its validation split, applied to its test split
THRESHOLD = "threshold"  # the positive class's probability threshold behind accuracy/F1 here
THRESHOLD_SOURCE = "threshold_source"  # "validation" or "train.threshold" (none reached the precision)
VALIDATION_RECORDS = "validation_records"
VALIDATION_RECALL_AT_PRECISION = "validation_recall_at_precision"
PRECISION_AT_THRESHOLD = "precision_at_threshold"  # the positive class's, on the test split
RECALL_AT_THRESHOLD = "recall_at_threshold"

# one client's entry under CLIENTS
CLIENT_ID = "id"
CLIENT_NODE_ID = "node_id"  # the node's authenticated id (Flower's src_node_id); id is what it reports
CLIENT_WEIGHT = "aggregation_weight"  # what the aggregation weighed it by, where not num_examples (strategy.weighting)

# the privacy section (PRIVACY)
PRIVACY_NODES = "nodes"  # node id -> the id it reported and its last lifetime epsilon
MAX_CLIENT_EPSILON = "max_client_epsilon"
EPSILON_WENT_BACK = "epsilon_went_back"  # nodes whose reported lifetime epsilon decreased
NUM_EXAMPLES = "num_examples"  # also the example count of every evaluation report
CLIENT_REJECTED = "rejected"  # why the reply failed screening (only on rejected replies)


def reply_to_record(metrics: dict) -> dict:
    """A client's reply metrics as its metrics.json entry: id, num_examples, then the rest in snake_case."""
    entry = {CLIENT_ID: int(metrics.get(PARTITION_ID, -1)),
             NUM_EXAMPLES: int(metrics.get(NUM_EXAMPLES_MSG, 0))}
    for key, value in metrics.items():
        if key not in (PARTITION_ID, NUM_EXAMPLES_MSG):
            entry[key.replace("-", "_")] = value
    return entry


def report_to_reply(report: dict) -> dict:
    """An evaluation report's numeric figures as reply metrics (its example count left to the caller)."""
    return {key.replace("_", "-") if key in _SNAKE_TIMINGS else key: float(value)
            for key, value in report.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and key != NUM_EXAMPLES and key not in RANKING}


_SNAKE_TIMINGS = ("eval_seconds",)  # evaluation figures keep their names; timings travel kebab-case
# Figures of a whole split's ranking stay with the server's evaluation: averaging
# clients' AUCs means nothing, and a client holding one class has none to send
# (its reply would then lack keys the others send).
RANKING = (ROC_AUC, AVERAGE_PRECISION, RECALL_AT_PRECISION, THRESHOLD_AT_PRECISION, TARGET_PRECISION)
