"""Per-epoch monitoring on the held-out validation slice and the catastrophic-overfitting watch.

Catastrophic overfitting (CO; Wong et al. 2020) shows as PGD accuracy collapsing while the
model learns to resist the single-step attack it trains on. A large FGSM-PGD gap alone does
not say so: early in single-step training it is common and often passes (FGSM-RS on MNIST at
ε = 0.3 after its first epoch: PGD 0.06 against FGSM 0.69, then PGD 0.51 after its second,
then 0.87 — the recovery Li et al. 2020 describe). So the watchdog records the gap as its
own state and raises the alarm (``catastrophic_overfitting``) only once the gap has
persisted, PGD accuracy is not rising, and the training attack has stopped working
(``COWatchdog``). Checks run at every epoch's end and, with ``monitor.probes``, a few times
within the epoch on a small slice (``probe``), so that an onset is seen where it happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bulwark.attacks import FGSM, PGD, dlr


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return (model(x).argmax(1) == y).sum()


def monitor(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, steps: int,
            alpha: float, batch_size: int, dlr_pgd: bool = False) -> dict[str, float]:
    """Clean, FGSM and PGD-`steps` accuracy (step α·ε, random start) in eval mode; with
    ``dlr_pgd`` also ``dlr_acc``, the same PGD ascending the DLR loss (the gradient-masking
    check; skipped for fewer than 3 classes, where DLR is undefined)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.long, device=x.device)
    fgsm = FGSM(model, eps, norm=norm)
    pgd = PGD(model, eps, alpha=alpha * eps, steps=steps, norm=norm)
    pgd_dlr = PGD(model, eps, alpha=alpha * eps, steps=steps, norm=norm, objective=dlr)
    classes = 0
    try:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            with torch.no_grad():
                logits = model(xb)
            classes = logits.shape[1]
            counts[0] += (logits.argmax(1) == yb).sum()
            counts[1] += _accuracy(model, fgsm(xb, yb), yb)
            counts[2] += _accuracy(model, pgd(xb, yb), yb)
            if dlr_pgd and classes >= 3:
                counts[3] += _accuracy(model, pgd_dlr(xb, yb), yb)
    finally:
        model.train(was_training)
    n = max(int(x.shape[0]), 1)
    clean, f, p, d = (c / n for c in counts.tolist())
    out = {"clean_acc": clean, "fgsm_acc": f, "pgd_acc": p, "n": int(x.shape[0])}
    if dlr_pgd and classes >= 3:
        out["dlr_acc"] = d
    return out


@dataclass
class COWatchdog:
    """The watch over a single-step run: what it records, and the one state it alarms on.

    Every check (an epoch's end, or a probe within the epoch: ``t`` in epochs, 2.25 = a
    quarter into epoch 3) takes the monitor's clean, FGSM and PGD accuracy. The states, each
    its own event (rules in docs/methods.md, "The watchdog"):

    - ``fgsm_pgd_gap`` (recorded): PGD accuracy under ``co_drop`` x max(best PGD so far,
      FGSM) and at least ``co_gap`` under FGSM. Common and often passing early in single-step
      training: a model that is not robust *yet* (FGSM-RS on MNIST at ε = 0.3 after its
      first epoch: PGD 0.06 against FGSM 0.69, then 0.51 an epoch later; Li et al. 2020). An
      episode that ends without an alarm closes with ``fgsm_pgd_gap_closed``.
    - ``catastrophic_overfitting`` (the alarm: the "!!" line, ``stop`` and ``remediate`` act
      on it alone): the gap has held at every check for ``co_patience`` epochs, PGD accuracy
      has not risen by ``co_rise`` over that span, and either the model resists the
      single-step attack it trains on (FGSM accuracy ≥ ``co_resist`` x clean) or PGD finds
      nearly every image FGSM does not (PGD < ``co_deep`` x FGSM): the training attack no
      longer works while a multi-step one does (Wong et al. 2020; Kim et al. 2021; de Jorge et
      al. 2022). It stays open until PGD accuracy is back (``co_recovered``).
    - ``under_training`` (recorded): a gap that has persisted ``under_after`` epochs (1) while
      the training attack still works (FGSM under ``co_resist`` x clean, PGD not under
      ``co_deep`` x FGSM): the model has not learned to resist even the single-step attack
      (ELLE on MNIST at ε = 0.3: FGSM 0.5-0.7 against clean 0.8-0.9, PGD 0.2-0.35).
    - ``accuracy_collapse`` and ``gradient_masking``: below.

    The thresholds were chosen on half of the project's committed study runs and checked on
    the other half against outcome labels made without the watchdog
    (experiments/watchdog/measure.py; docs/experiments.md, "Does the alarm predict the
    outcome?").
    """

    co_drop: float = 0.5
    co_gap: float = 0.2
    co_patience: float = 0.5  # epochs the gap must persist before it is an alarm
    co_rise: float = 0.1  # PGD accuracy rising this much over that span: not (yet) CO
    co_resist: float = 0.8  # FGSM ≥ this x clean: the training attack no longer works ...
    co_deep: float = 0.01  # ... or PGD < this x FGSM: multi-step attacks find (nearly) all
    under_after: float = 1.0  # epochs a gap with the training attack still working must last
    best_pgd: float | None = None
    flagged: bool = False  # the alarm's episode is open
    events: list[dict] = field(default_factory=list)
    best_clean: float | None = None
    collapsed: bool = False
    best_fgsm: float | None = None
    onset_pgd: float | None = None  # PGD accuracy when the open gap episode began
    mask_gap: float | None = None  # the gradient-masking check's gap (None: off)
    masked: bool = False  # the check held at the last judged epoch
    gap: list[list[float]] = field(default_factory=list)  # (t, PGD) of the open gap episode
    under: bool = False  # under_training recorded in the open gap episode

    def check(self, t: float, m: dict[str, float]) -> bool:
        """Update with the monitor figures of check ``t`` (epochs: an epoch's end is its
        number); True while the alarm's episode is open.

        Recovery: an alarm's episode stays open until PGD accuracy comes back:
        ``pgd_acc ≥ co_drop · max(best PGD so far, fgsm_acc)`` and at least ``co_gap`` above
        the PGD accuracy where the gap began. FGSM accuracy falling to PGD's is no recovery
        (plain FGSM on MNIST at ε = 0.4: PGD 0.000 with FGSM 0.40, then 0.18, then 0.70
        again; RS-AAER there: PGD 0.000 with FGSM 0.58, then PGD and FGSM both 0.11 at clean
        0.56 — the gap's terms no longer hold, yet no robustness came back).

        Also records an ``accuracy_collapse`` event when clean accuracy falls below
        ``co_drop`` x the best accuracy the model has shown, clean or under FGSM, at a check
        where the gap does not hold (every attack then "fails" alike, so the gap cannot show
        it: seen with N-FGSM + AAER on MNIST at ε = 0.3 falling to a constant predictor).
        FGSM counts because a model in CO can classify FGSM's images and not the clean ones
        (GradAlign on MNIST, seed 1: clean 0.113, FGSM 0.978 after epoch 1, a constant
        prediction from epoch 2): its fall is no recovery."""
        clean, fgsm, pgd = m["clean_acc"], m["fgsm_acc"], m["pgd_acc"]
        epoch = math.ceil(t - 1e-9)
        at = {} if t == epoch else {"at_epoch": round(t, 4)}
        figures = {"pgd_acc": pgd, "fgsm_acc": fgsm, "clean_acc": clean}
        pgd_low = pgd < self.co_drop * max(self.best_pgd or 0.0, fgsm)
        holds = pgd_low and fgsm - pgd >= self.co_gap
        best = max((a for a in (self.best_clean, self.best_fgsm) if a is not None), default=None)
        down = best is not None and clean < self.co_drop * best and not holds
        if down and not self.collapsed:
            self.events.append({
                "type": "accuracy_collapse", "epoch": epoch, **at, **figures,
                "best_clean_acc": self.best_clean, "best_fgsm_acc": self.best_fgsm,
                "rule": f"clean_acc < {self.co_drop} x max(best_clean_acc, best_fgsm_acc)"})
        self.collapsed = down
        self.best_clean = clean if self.best_clean is None else max(self.best_clean, clean)
        self.best_fgsm = fgsm if self.best_fgsm is None else max(self.best_fgsm, fgsm)
        if holds:
            self._gap(t, epoch, at, figures)
        elif self.gap:
            self._no_gap(epoch, at, figures, pgd_low, down)
        self.best_pgd = pgd if self.best_pgd is None else max(self.best_pgd, pgd)
        self._check_masking(epoch, m)
        return self.flagged

    def _gap(self, t: float, epoch: int, at: dict, figures: dict) -> None:
        pgd, fgsm, clean = figures["pgd_acc"], figures["fgsm_acc"], figures["clean_acc"]
        if not self.gap:
            self.onset_pgd = pgd
            self.events.append({
                "type": "fgsm_pgd_gap", "epoch": epoch, **at, **figures,
                "best_pgd_acc": self.best_pgd,
                "rule": f"pgd_acc < {self.co_drop} x max(best_pgd_acc, fgsm_acc) and "
                        f"fgsm_acc - pgd_acc >= {self.co_gap}"})
        self.gap.append([t, pgd])
        onset = self.gap[0][0]
        if self.flagged or t - onset < self.co_patience - 1e-9:
            return
        ref = [p for s, p in self.gap if s <= t - self.co_patience + 1e-9][-1]
        if pgd >= ref + self.co_rise:  # still rising: perhaps not robust *yet*
            return
        since = {"gap_since_epoch": math.ceil(onset - 1e-9), "pgd_acc_then": ref}
        if fgsm >= self.co_resist * clean or pgd < self.co_deep * fgsm:
            self.flagged = True
            pattern = ("fgsm_above_clean" if fgsm > clean else "fell_after_rising"
                       if (self.best_pgd or 0.0) >= self.co_gap else "never_robust")
            self.events.append({
                "type": "catastrophic_overfitting", "epoch": epoch, **at, **figures, **since,
                "best_pgd_acc": self.best_pgd, "pattern": pattern,
                "rule": f"the gap held for {self.co_patience:g} epoch(s), pgd_acc rose less "
                        f"than {self.co_rise}, and fgsm_acc >= {self.co_resist} x clean_acc or "
                        f"pgd_acc < {self.co_deep} x fgsm_acc"})
        elif not self.under and t - onset >= self.under_after - 1e-9:
            # a model on its way into CO passes through this state for a probe or two: only a
            # gap that has lasted under_after epochs so is recorded
            self.under = True
            self.events.append({
                "type": "under_training", "epoch": epoch, **at, **figures, **since,
                "rule": f"the gap held for {self.under_after:g} epoch(s) while fgsm_acc < "
                        f"{self.co_resist} x clean_acc and pgd_acc >= {self.co_deep} x "
                        "fgsm_acc: the training attack still works"})

    def _no_gap(self, epoch: int, at: dict, figures: dict, pgd_low: bool, down: bool) -> None:
        onset = math.ceil(self.gap[0][0] - 1e-9)
        if not self.flagged:
            self.events.append({"type": "fgsm_pgd_gap_closed", "epoch": epoch, **at,
                                "onset_epoch": onset, **figures})
        elif not pgd_low and figures["pgd_acc"] >= (self.onset_pgd or 0.0) + self.co_gap \
                and not down:  # a fall to chance is no recovery
            self.events.append({"type": "co_recovered", "epoch": epoch, **at,
                                "onset_epoch": next(
                                    e["epoch"] for e in reversed(self.events)
                                    if e["type"] == "catastrophic_overfitting"), **figures})
            self.flagged = False
        else:
            return  # the alarm's episode stays open
        self.gap, self.onset_pgd, self.under = [], None, False

    def _check_masking(self, epoch: int, m: dict[str, float]) -> None:
        """A ``gradient_masking`` event when PGD on cross-entropy leaves ``mask_gap`` more
        accuracy than the same PGD on the DLR loss (one event per stretch of such epochs).
        A saturated softmax zeroes cross-entropy's input gradient, so PGD-CE stalls where
        the scale-free DLR loss still points somewhere (Croce & Hein 2020); Carlini et al.
        2019 ask for exactly this check, two losses that should agree. GradAlign on MNIST
        (ε 0.1, CPU; ε 0.2, GPU) trained into this with the CE monitor at 0.9+ while
        APGD's DLR attacks found 7-86 points less. Recorded, never acted on."""
        dlr_acc = m.get("dlr_acc")
        masked = (self.mask_gap is not None and dlr_acc is not None
                  and m["pgd_acc"] - dlr_acc >= self.mask_gap)
        if masked and not self.masked:
            self.events.append({
                "type": "gradient_masking", "epoch": epoch, "pgd_acc": m["pgd_acc"],
                "dlr_acc": dlr_acc, "fgsm_acc": m["fgsm_acc"], "clean_acc": m["clean_acc"],
                "rule": f"pgd_acc - dlr_acc >= {self.mask_gap}"})
        self.masked = masked

    def state_dict(self) -> dict:
        return {"best_pgd": self.best_pgd, "flagged": self.flagged, "events": self.events,
                "best_clean": self.best_clean, "collapsed": self.collapsed,
                "best_fgsm": self.best_fgsm, "onset_pgd": self.onset_pgd,
                "masked": self.masked, "gap": self.gap, "under": self.under}

    def load_state_dict(self, s: dict) -> None:
        self.best_pgd, self.flagged, self.events = s["best_pgd"], s["flagged"], list(s["events"])
        self.best_clean, self.collapsed = s.get("best_clean"), s.get("collapsed", False)
        self.best_fgsm = s.get("best_fgsm")
        self.onset_pgd = s.get("onset_pgd")
        self.masked = s.get("masked", False)
        self.gap = [list(g) for g in s.get("gap") or []]
        self.under = s.get("under", False)
