"""What a run and a state folder say about privacy: metrics.json's section, `fedcl privacy`.

`run_section` is the run's promise (mode, delta, target, cap, accountant);
`note_clients` adds what each client reported (its noise and sample rate,
which depend on its number of records, and its lifetime epsilon).
`find_ledgers` / `format_ledger` back the `fedcl privacy STATE_DIR` command.
"""

from __future__ import annotations

from pathlib import Path

from fedcl import keys
from fedcl.config import Config
from fedcl.privacy.ledger import LEDGER_FILE, PrivacyLedger


def run_section(config: Config) -> dict:
    p, fed = config.privacy, config.federation
    if p.mode == "client":  # the server's planned figures; each round records its epsilon
        from fedcl.privacy.accounting import client_level_plan

        plan = client_level_plan(config)
        return {"mode": "client", "target_epsilon": p.target_epsilon, **plan.to_dict(),
                "planned_epsilon": plan.epsilon_after(plan.rounds)}
    return {
        "mode": p.mode, "delta": p.delta, "target_epsilon": p.target_epsilon,
        "noise_multiplier": p.noise_multiplier, "budget_epsilon": p.budget_epsilon,
        "accountant": p.accountant, "max_grad_norm": p.max_grad_norm,
        "planned_steps": fed.rounds * config.train.local_steps,
        # Each client's noise and sample rate depend on its record count (the
        # noise is calibrated per client from target_epsilon): see "clients".
        "expected_batch_size": config.train.batch_size,
    }


def note_clients(section: dict, clients: list[dict]) -> None:
    """Record each client's reported DP parameters and latest epsilon in `section`."""
    known = section.setdefault(keys.CLIENTS, {})
    for client in clients:
        if "epsilon" not in client:
            continue
        entry = known.setdefault(str(client["id"]), {})
        entry["epsilon"] = client["epsilon"]
        for key in ("noise_multiplier", "sample_rate"):
            if key in client:
                entry[key] = client[key]
    if known:
        section["max_client_epsilon"] = max(c["epsilon"] for c in known.values())


def find_ledgers(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    found = sorted(root.rglob(LEDGER_FILE))
    if not found:
        raise FileNotFoundError(f"{root}: no {LEDGER_FILE} found (is this a --state-dir with DP runs?)")
    return found


def format_ledger(path: Path, root: Path) -> str:
    """One ledger as text: per run, each round's steps, noise, sample rate and epsilon after."""
    ledger = PrivacyLedger.load(path)
    where = path.parent.relative_to(root) if path.parent != root else Path(".")
    lines = [f"{where}  ({len(ledger.entries)} rounds charged)"]
    run = None
    for e in ledger.entries:
        if e["run"] != run:
            run = e["run"]
            lines.append(f"  run {run or '(unnamed)'}")
        lines.append(f"    round {e[keys.ROUND]:>4} | steps {e['steps']:>4} | noise {e['noise_multiplier']:.4f} "
                     f"| sample rate {e['sample_rate']:.4f} | delta {e['delta']:.1e} "
                     f"| eps after {e['epsilon']:.4f} ({e['accountant']})")
    if ledger.entries:
        last = ledger.entries[-1]
        total = ledger.epsilon(delta=last["delta"], accountant=last["accountant"])
        lines.append(f"  lifetime epsilon {total:.4f} at delta {last['delta']:.1e} ({last['accountant']})")
    return "\n".join(lines)
