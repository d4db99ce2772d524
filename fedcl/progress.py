"""Progress on the terminal: a bar over rounds and one plain line per round."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def _headline(ev: dict) -> str:
    if "accuracy" in ev:
        return (f"accuracy {ev['accuracy']:.3f} (majority {ev.get('majority_baseline', 0):.3f}) "
                f"| macro-F1 {ev.get('macro_f1', 0):.3f}")
    if "loss" in ev:
        return f"loss {ev['loss']:.3f} | perplexity {ev.get('perplexity', 0):.1f}"
    return ""


class RoundProgress:
    def __init__(self, total: int, done: int):
        self.bar = tqdm(total=total, initial=done, desc="rounds", unit="round", file=sys.stderr,
                        dynamic_ncols=True)

    def initial(self, ev: dict) -> None:
        self.bar.write(f"server | round 0 | {_headline(ev)}")

    def round_done(self, record: dict) -> None:
        self.bar.write(
            f"server | round {record['round']} | {_headline(record.get('eval', {}))} "
            f"| up {record.get('bytes_up', 0) / 1e6:.2f} MB | down {record.get('bytes_down', 0) / 1e6:.2f} MB"
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
