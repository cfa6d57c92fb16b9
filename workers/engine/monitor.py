"""Per-epoch monitoring on the held-out validation slice and the catastrophic-overfitting watch.

Catastrophic overfitting (CO; Wong et al. 2020) shows as PGD accuracy collapsing within an
epoch or two while accuracy against the single-step attack the model trains on stays high.
Rule (all on the monitor slice, model in eval mode): at epoch e, CO is flagged when

    pgd_acc(e) < co_drop · max(max_{e' < e} pgd_acc(e'), fgsm_acc(e))
    and   fgsm_acc(e) − pgd_acc(e) ≥ co_gap

(defaults co_drop = 0.5, co_gap = 0.2): PGD accuracy fell to under half its best so far, or
it is under half the FGSM accuracy of the same epoch — the second catches a model that
overfits before it was ever robust (seen on MNIST at ε = 0.3, where plain FGSM with Adam has
PGD accuracy 0.00 against FGSM 0.93 after its first epoch). An event is recorded at the onset
(a flagged epoch outside an open episode), with the epoch and the figures; every epoch's
history row says whether the rule held. A run can come back: when PGD accuracy is back (the
rule's first half no longer holds, and PGD accuracy is at least co_gap above where it stood
at the onset) a ``co_recovered`` event closes the episode (FGSM-RS on
MNIST at ε = 0.3 is flagged after its first epoch, at PGD 0.08 against FGSM 0.73, then learns
to PGD 0.90 — the recovery Li et al. 2020 describe), so a report tells a passing episode from
a collapse that lasts to the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attacks import FGSM, PGD, dlr


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
    co_drop: float = 0.5
    co_gap: float = 0.2
    best_pgd: float | None = None
    flagged: bool = False
    events: list[dict] = field(default_factory=list)
    best_clean: float | None = None
    collapsed: bool = False
    best_fgsm: float | None = None
    onset_pgd: float | None = None  # PGD accuracy when the open episode began
    mask_gap: float | None = None  # the gradient-masking check's gap (None: off)
    masked: bool = False  # the check held at the last judged epoch

    def check(self, epoch: int, m: dict[str, float]) -> bool:
        """Update with epoch ``epoch``'s monitor figures; True when the CO rule holds.

        An episode opens with a ``catastrophic_overfitting`` event and stays open until PGD
        accuracy comes back: ``pgd_acc ≥ co_drop · max(best PGD so far, fgsm_acc)`` (the
        rule's first half no longer holding) and at least ``co_gap`` above the PGD accuracy at
        the onset. FGSM accuracy falling to PGD's is no recovery (plain FGSM on MNIST at
        ε = 0.4: PGD 0.000 with FGSM 0.40, then 0.18, then 0.70 again; RS-AAER there: PGD 0.000
        with FGSM 0.58 at the onset, then PGD and FGSM both 0.11 at clean 0.56 — the rule's
        terms no longer hold, yet no robustness came back).

        Also records an ``accuracy_collapse`` event when clean accuracy falls below
        ``co_drop`` x the best accuracy the model has shown, clean or under FGSM, at an epoch
        where the CO rule does not hold (every attack then "fails" alike, so the CO rule cannot
        see it: seen with N-FGSM + AAER on MNIST at ε = 0.3 falling to a constant predictor).
        FGSM counts because a model in CO can classify FGSM's images and not the clean ones
        (GradAlign on MNIST, seed 1: clean 0.113, FGSM 0.978 after epoch 1, a constant
        prediction from epoch 2): its fall is no recovery. While the rule holds, the episode
        already says what is wrong (FGSM's images leak the label, clean accuracy sags)."""
        clean, fgsm, pgd = m["clean_acc"], m["fgsm_acc"], m["pgd_acc"]
        pgd_low = pgd < self.co_drop * max(self.best_pgd or 0.0, fgsm)
        holds = pgd_low and fgsm - pgd >= self.co_gap
        best = max((a for a in (self.best_clean, self.best_fgsm) if a is not None), default=None)
        down = best is not None and clean < self.co_drop * best and not holds
        if down and not self.collapsed:
            self.events.append({
                "type": "accuracy_collapse", "epoch": epoch, "clean_acc": clean,
                "best_clean_acc": self.best_clean, "best_fgsm_acc": self.best_fgsm,
                "pgd_acc": pgd, "fgsm_acc": fgsm,
                "rule": f"clean_acc < {self.co_drop} x max(best_clean_acc, best_fgsm_acc)"})
        self.collapsed = down
        self.best_clean = clean if self.best_clean is None else max(self.best_clean, clean)
        self.best_fgsm = fgsm if self.best_fgsm is None else max(self.best_fgsm, fgsm)
        back = not pgd_low and pgd >= (self.onset_pgd or 0.0) + self.co_gap
        recovered = self.flagged and back and not down  # a fall to chance is none
        if holds and not self.flagged:
            self.onset_pgd = pgd
            self.events.append({
                "type": "catastrophic_overfitting", "epoch": epoch, "pgd_acc": pgd,
                "fgsm_acc": fgsm, "clean_acc": m["clean_acc"], "best_pgd_acc": self.best_pgd,
                "rule": f"pgd_acc < {self.co_drop} x max(best_pgd_acc, fgsm_acc) and "
                        f"fgsm_acc - pgd_acc >= {self.co_gap}",
            })
        elif recovered:
            onset = next(e["epoch"] for e in reversed(self.events)
                         if e["type"] == "catastrophic_overfitting")
            self.events.append({
                "type": "co_recovered", "epoch": epoch, "onset_epoch": onset, "pgd_acc": pgd,
                "fgsm_acc": fgsm, "clean_acc": m["clean_acc"]})
        self.flagged = holds or (self.flagged and not recovered)  # the episode is open
        if not self.flagged:
            self.onset_pgd = None
        self.best_pgd = pgd if self.best_pgd is None else max(self.best_pgd, pgd)
        self._check_masking(epoch, m)
        return holds

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
                "masked": self.masked}

    def load_state_dict(self, s: dict) -> None:
        self.best_pgd, self.flagged, self.events = s["best_pgd"], s["flagged"], list(s["events"])
        self.best_clean, self.collapsed = s.get("best_clean"), s.get("collapsed", False)
        self.best_fgsm = s.get("best_fgsm")
        self.onset_pgd = s.get("onset_pgd")
        self.masked = s.get("masked", False)
