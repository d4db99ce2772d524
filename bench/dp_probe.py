"""The floor the DP adapter recipe must beat: a DP linear probe on the frozen model (issue 14).

    .venv/bin/python -m bench.dp_probe --dataset icd10 --pool /tmp/fedcl-dp-recipe/pool/icd10

Features: the base model's final-norm hidden state at each record's last token (no
adapter), scaled to unit length per record (no statistic of the data is used, so the
scaling costs no privacy). The probe is one linear layer (hidden x labels), trained
centralised on every client's training records pooled (the records the federation
trains on), with Opacus' DP-SGD (Poisson batches of 1,024 expected, clip 1.0, SGD)
for 20 epochs at epsilon 1, 3 and 8 (delta 1e-5) and without DP. The learning rate of
each row is chosen on the clients' validation splits pooled (held out of training),
never on the test split; the chosen probe is then scored once on the test split.

The features come through `fedcl.frozen.FrozenBottom` with the recipe's
`lora.top_layers`, so a pool of frozen states made by bench/dp_recipe.py
(`--pool`, a folder searched for its `.fedcl` files) spares the
bottom layers' forward; records not in it are computed. One torch thread. Results go
to bench/results/dp_probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fedcl import atomic, keys

RESULTS = Path(__file__).parent / "results" / "dp_probe.json"
REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"icd10": ("configs/dp-icd10.toml", "icd10-chapters"),
           "cfpb": ("configs/dp-cfpb.toml", "cfpb-complaints")}
CLIENTS, EPOCHS, BATCH, CLIP, DELTA = 5, 20, 1024, 1.0, 1e-5
LRS = (3.0, 10.0, 30.0, 100.0)  # unit-length features give small logits: large steps


def features(config, records: list[dict], task, model) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, len(records), 64):
            batch = task.encode(records[start:start + 64])
            out.append(task.body.last_token(model, batch))
    x = torch.cat(out)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def train_probe(x, y, labels: int, *, lr: float, epsilon: float, seed: int):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], labels)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    sigma = 0.0
    if epsilon > 0:
        engine = PrivacyEngine(accountant="rdp")
        probe, optimizer, loader = engine.make_private_with_epsilon(
            module=probe, optimizer=optimizer, data_loader=loader, target_epsilon=epsilon,
            target_delta=DELTA, epochs=EPOCHS, max_grad_norm=CLIP)
        sigma = optimizer.noise_multiplier
    for _ in range(EPOCHS):
        for xb, yb in loader:
            if len(xb) == 0:
                continue
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(probe(xb), yb).backward()
            optimizer.step()
    spent = engine.get_epsilon(DELTA) if epsilon > 0 else 0.0
    return probe, sigma, spent


def accuracy_and_f1(probe, x, y, labels: list[str]) -> tuple[float, float]:
    from fedcl import metrics

    with torch.no_grad():
        pred = probe(x).argmax(dim=1)
    report = metrics.classification_report(y.tolist(), pred.tolist(), labels)
    return report[keys.ACCURACY], report[keys.MACRO_F1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(CONFIGS), default="icd10")
    ap.add_argument("--pool", help="frozen states to start from (frozen-states.fedcl or merged.fedcl)")
    ap.add_argument("--epsilons", default="0,1,3,8", help="0: without DP")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", help="a file to keep the features in between runs of the same settings")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from fedcl import data, frozen
    from fedcl.config import load_config
    from fedcl.models import build_lora_model
    from fedcl.tasks import make_task

    config_file, dataset = CONFIGS[args.dataset]
    config = load_config(REPO / config_file, [f"data.dataset={dataset}", f"train.seed={args.seed}"])
    model, tokenizer = build_lora_model(config.model, config.lora)  # B = 0: the base model's answers
    model.eval()
    ds = data.load_dataset(config.data, seed=args.seed)
    task = make_task("classification", tokenizer, ds.labels, config.data, config.model, config.train)
    frozen.use_frozen_bottom(task, model, config.model, config.lora)
    if args.pool:  # every frozen-states file under the folder, if made with these settings
        for path in sorted(Path(args.pool).rglob("*.fedcl")):
            for key, states in frozen.read_states(path, task.body.fingerprint).items():
                task.body.store.put(key, states)
        print(f"pool: {len(task.body.store)} records' states", flush=True)
    splits = [data.client_split(config.data, ds, c, CLIENTS, args.seed) for c in range(CLIENTS)]
    train = [r for t, _ in splits for r in t]
    valid = [r for _, v in splits for r in v]
    index = {label: i for i, label in enumerate(ds.labels)}
    started = time.perf_counter()
    saved = Path(args.features) if args.features else None
    if saved and saved.exists():
        xs = torch.load(saved, weights_only=True)
    else:
        xs = {name: features(config, recs, task, model) for name, recs in
              (("train", train), ("validation", valid), ("test", ds.test))}
        if saved:
            torch.save(xs, saved)
    ys = {name: torch.tensor([index[r["label"]] for r in recs]) for name, recs in
          (("train", train), ("validation", valid), ("test", ds.test))}
    feature_seconds = time.perf_counter() - started
    majority = float((ys["test"] == torch.mode(ys["train"]).values).float().mean())
    rows = []
    for epsilon in (float(e) for e in args.epsilons.split(",")):
        tried = []
        for lr in LRS:
            probe, sigma, spent = train_probe(xs["train"], ys["train"], len(ds.labels), lr=lr,
                                              epsilon=epsilon, seed=args.seed)
            tried.append((accuracy_and_f1(probe, xs["validation"], ys["validation"], ds.labels)[0],
                          lr, probe, sigma, spent))
        val, lr, probe, sigma, spent = max(tried, key=lambda t: t[0])
        acc, f1 = accuracy_and_f1(probe, xs["test"], ys["test"], ds.labels)
        row = {"dataset": args.dataset, "epsilon": epsilon, "seed": args.seed, "lr": lr,
               "validation_by_lr": {str(t[1]): round(t[0], 4) for t in tried}, "validation_accuracy": val,
               "accuracy": acc, "macro_f1": f1, "noise_multiplier": sigma, "epsilon_spent": spent,
               "majority": majority, "train_records": len(train), "test_records": len(ds.test)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
        kept = [r for r in old["rows"] if (r["dataset"], r["epsilon"], r["seed"]) != (args.dataset, epsilon, args.seed)]
        atomic.write_json(RESULTS, {"how": __doc__.split("\n\n")[2].strip(), "feature_seconds": feature_seconds,
                                    "settings": {"epochs": EPOCHS, "batch": BATCH, "clip": CLIP, "delta": DELTA,
                                                 "lrs": list(LRS)}, "rows": kept + [row]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
