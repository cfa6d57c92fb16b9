"""Progress bars from a job's events, for ``bulwark submit --wait``, ``Job.wait()`` and the
phases of ``bulwark run`` after training.

One bar per phase: epochs (clean / PGD accuracy of the last epoch), then one per final attack
(``last pgd50-10``, points done of n, with tqdm's ETA), then certification (points certified,
the trainer's own ETA). A catastrophic-overfitting event prints a line above the bars.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from bulwark.contract.api import TERMINAL_STATES as TERMINAL
from bulwark.contract.report import WATCH_EVENTS, Event
from bulwark.workers.engine.bars import bar


class ProgressView:
    """Feed it ``(kind, data)`` events; it keeps the bars. ``epochs=False`` when another bar
    (the local runner's step bar) already shows training."""

    def __init__(self, label: str, *, epochs: bool = True, enabled: bool = True):
        self.label, self.epochs, self.enabled = label, epochs, enabled
        self.current: tqdm | None = None
        self.key: tuple | None = None

    def _open(self, key: tuple, **kwargs: Any) -> tqdm:
        if self.key != key:
            self.close()
            self.current, self.key = bar(**kwargs), key
        assert self.current is not None
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
        self.current, self.key = None, None

    def write(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stderr)

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if kind in ("started", "resumed") and self.epochs and data.get("epochs"):
            b = self._open(("epochs",), total=data["epochs"], unit="epoch",
                           desc=f"{self.label} train")
            b.n = data.get("start_epoch", data.get("epoch", 0))
            b.refresh()
        elif kind == "epoch" and self.epochs:
            b = self._open(("epochs",), total=None, unit="epoch", desc=f"{self.label} train")
            b.n = data.get("epoch", b.n + 1)
            mon = data.get("monitor") or {}
            if mon:
                b.set_postfix(clean=f"{mon['clean_acc']:.3f}", pgd=f"{mon['pgd_acc']:.3f}")
            b.refresh()
        elif kind in WATCH_EVENTS:
            line = Event.model_validate({**data, "type": kind}).line()
            if line:
                self.write(f"{self.label}: {line}")
        elif kind == "phase" and data.get("attack"):
            self._open(("attack", data.get("model"), data["attack"]), total=data.get("n"),
                       unit="pt", desc=f"{self.label} {data.get('model', '')} {data['attack']}")
        elif kind == "phase":
            self.close()
        elif kind == "evaluation":
            b = self._open(("attack", data.get("model"), data.get("attack")),
                           total=data.get("total"), unit="pt",
                           desc=f"{self.label} {data.get('model', '')} {data.get('attack')}")
            b.n = data.get("done", 0)
            b.refresh()
        elif kind == "certification":
            b = self._open(("certify",), total=data.get("total"), unit="pt",
                           desc=f"{self.label} certify")
            b.n = data.get("done", 0)
            eta = data.get("eta_seconds")
            if eta is not None:
                b.set_postfix(eta=f"{eta:.0f}s",
                              samples_s=f"{data.get('samples_per_second', 0):.0f}")
            b.refresh()
        elif kind in TERMINAL or kind == "finished":
            self.close()
