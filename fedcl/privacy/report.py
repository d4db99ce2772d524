"""What a run and a state folder say about privacy: metrics.json's section, `fedcl privacy`.

`run_section` is the run's promise (mode, delta, target, cap, accountant);
`note_clients` adds what each client reported (its noise and sample rate,
which depend on its number of records, and its lifetime epsilon).
`find_ledgers` / `format_ledger` back the `fedcl privacy STATE_DIR` command.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedcl import keys
from fedcl.config import Config
from fedcl.privacy.ledger import LEDGER_FILE, PrivacyLedger

logger = logging.getLogger("fedcl.privacy")


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


def note_clients(section: dict, clients: list[dict], *, server_round: int | None = None) -> None:
    """Record each client's reported DP parameters and latest epsilon in `section`.

    Per reported id (what users read) and per node (the authenticated id): a
    node's lifetime epsilon can only grow, so one that goes back (a reset or
    swapped ledger, or a node reporting under another's id) is flagged and
    logged, and the maximum is taken over both views, so no report can lower it.
    """
    known = section.setdefault(keys.CLIENTS, {})
    nodes = section.setdefault(keys.PRIVACY_NODES, {})
    for client in clients:
        if keys.EPSILON not in client:
            continue
        entry = known.setdefault(str(client[keys.CLIENT_ID]), {})
        entry[keys.EPSILON] = client[keys.EPSILON]
        for key in ("noise_multiplier", "sample_rate"):
            if key in client:
                entry[key] = client[key]
        node = client.get(keys.CLIENT_NODE_ID)
        if node is None:
            continue
        before = nodes.get(str(node), {}).get(keys.EPSILON)
        if before is not None and client[keys.EPSILON] < before * (1 - 1e-9):
            section.setdefault(keys.EPSILON_WENT_BACK, []).append(
                {keys.CLIENT_NODE_ID: node, keys.CLIENT_ID: client[keys.CLIENT_ID], "round": server_round,
                 "before": before, "now": client[keys.EPSILON]})
            logger.warning("round %s: node %s reported lifetime epsilon %.4g, below its earlier %.4g: "
                           "its ledger was reset or replaced", server_round, node, client[keys.EPSILON], before)
        nodes[str(node)] = {keys.CLIENT_ID: client[keys.CLIENT_ID],
                            keys.EPSILON: max(client[keys.EPSILON], before or 0.0)}
    figures = [c[keys.EPSILON] for c in known.values()] + [n[keys.EPSILON] for n in nodes.values()]
    if figures:
        section[keys.MAX_CLIENT_EPSILON] = max(max(figures), section.get(keys.MAX_CLIENT_EPSILON, 0.0))


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
