"""Progress on the terminal: a bar over rounds and one plain line per round."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

from fedcl import keys


def _headline(ev: dict) -> str:
    if keys.ACCURACY in ev:
        return (f"accuracy {ev[keys.ACCURACY]:.3f} (majority {ev.get(keys.MAJORITY, 0):.3f}) "
                f"| macro-F1 {ev.get(keys.MACRO_F1, 0):.3f}")
    if keys.LOSS in ev:
        return f"loss {ev[keys.LOSS]:.3f} | perplexity {ev.get(keys.PERPLEXITY, 0):.1f}"
    return ""


class RoundProgress:
    def __init__(self, total: int, done: int):
        self.bar = tqdm(total=total, initial=done, desc="rounds", unit="round", file=sys.stderr,
                        dynamic_ncols=True)

    def evaluating(self, server_round: int, every: float = 30.0):
        """A `progress(done, total)` for the server's evaluation before `server_round` is
        committed: one line at most every `every` seconds, so a long evaluation is not silent."""
        started = last = time.monotonic()

        def report(done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= every:
                last = now
                self.bar.write(f"server | round {server_round} | evaluating: {done} of {total} records "
                               f"({now - started:.0f} s)")
        return report

    def initial(self, ev: dict) -> None:
        self.bar.write(f"server | round 0 | {_headline(ev)}")

    def round_done(self, record: dict) -> None:
        self.bar.write(
            f"server | round {record[keys.ROUND]} | {_headline(record.get(keys.EVAL, {}))} "
            f"| up {record.get(keys.BYTES_UP, 0) / 1e6:.2f} MB | down {record.get(keys.BYTES_DOWN, 0) / 1e6:.2f} MB"
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
