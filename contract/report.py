"""The robustness report as typed models (torch-free): what ``report.json`` holds.

``Report.model_validate(json.load(...))`` reads any report of ``report_version`` 1; fields a
later version adds are kept (``extra="allow"``), so an older SDK still reads a newer report.
Accuracies are fractions in [0, 1], always next to the number of points they count.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from bulwark.contract.spec import JobSpec, as_ran
from bulwark.contract.verdict import attack_warnings, final_split, pgd_reach, verdict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class AttackResult(_Open):
    """Accuracy under one attack: ``acc`` over ``n`` points, with the attack's parameters."""

    acc: float
    n: int
    params: dict[str, Any] = {}


class FinalResult(_Open):
    """The final suite for one model (``last``, ``best`` or ``wa``) on the test points."""

    clean_acc: float
    n: int
    model: str = "last"
    attacks: dict[str, AttackResult] = {}

    def _named(self, prefix: str) -> tuple[str | None, AttackResult | None]:
        return next(((k, a) for k, a in self.attacks.items() if k.startswith(prefix)),
                    (None, None))

    def _first(self, prefix: str) -> AttackResult | None:
        return self._named(prefix)[1]

    @property
    def fgsm(self) -> AttackResult | None:
        return self.attacks.get("fgsm")

    @property
    def pgd(self) -> AttackResult | None:
        return self._first("pgd")

    @property
    def autoattack(self) -> AttackResult | None:
        return self._first("autoattack")

    def warnings(self, pgd_reach: float | None = None) -> list[str]:
        """Where the attacks disagree as a masked gradient makes them (empty when they agree):
        ``bulwark.contract.verdict.attack_warnings`` (``pgd_reach``: the final PGD's steps × α)."""
        return attack_warnings({k: a.acc for k, a in self.attacks.items()}, self.n, pgd_reach)


class MonitorResult(_Open):
    """Per-epoch clean / FGSM / PGD accuracy on the held-out monitor slice."""

    clean_acc: float
    fgsm_acc: float
    pgd_acc: float
    n: int
    dlr_acc: float | None = None  # PGD on the DLR loss: the gradient-masking check


class HistoryRow(_Open):
    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    train_epsilon: float | None = None
    metrics: dict[str, float] = {}
    monitor: MonitorResult | None = None
    probes: list[dict[str, Any]] = []  # checks within the epoch: at_epoch, clean/FGSM/PGD
    catastrophic_overfitting: bool = False  # the watchdog's alarm is open at the epoch's end
    seconds: float
    train_seconds: float


def probe_time(probe: dict[str, Any]) -> float:
    """A probe's time in epochs (``at_epoch``; ``at`` in reports of 2026-12-06 morning)."""
    return probe["at_epoch"] if "at_epoch" in probe else probe["at"]


# the watchdog's event types (workers/engine/monitor.py); the alarm is catastrophic_overfitting
WATCH_EVENTS = ("fgsm_pgd_gap", "fgsm_pgd_gap_closed", "catastrophic_overfitting", "co_recovered",
                "under_training", "accuracy_collapse", "gradient_masking")


class Event(_Open):
    """A watchdog event (docs/methods.md, "The watchdog"): ``fgsm_pgd_gap`` (recorded) and
    its end ``fgsm_pgd_gap_closed``; the alarm ``catastrophic_overfitting`` and its end
    (``co_recovered``, with the ``onset_epoch``); ``under_training``; the onset of an
    ``accuracy_collapse`` (clean accuracy under half the best the model showed, clean or under
    FGSM) or of ``gradient_masking`` (PGD on cross-entropy ``masking_gap`` above PGD on DLR).
    ``at_epoch`` is the check's time in epochs when it was a probe within the epoch."""

    type: str
    epoch: int
    at_epoch: float | None = None  # a probe's time within the epoch (an SSE event's "at" is
    # the server's timestamp)
    pgd_acc: float | None = None
    dlr_acc: float | None = None
    fgsm_acc: float | None = None
    clean_acc: float | None = None
    best_pgd_acc: float | None = None
    best_clean_acc: float | None = None
    best_fgsm_acc: float | None = None
    rule: str | None = None

    @property
    def best_acc(self) -> float:
        """The accuracy an ``accuracy_collapse`` fell from: the best clean or FGSM figure."""
        return max(self.best_clean_acc or 0.0, self.best_fgsm_acc or 0.0)

    @property
    def when(self) -> str:
        """"epoch 3", or "epoch 3 (at 2.25)" for a probe within the epoch."""
        return f"epoch {self.epoch}" + (f" (at {self.at_epoch:g})" if self.at_epoch is not None
                                        else "")

    def line(self) -> str | None:
        """The event as one line for a person (CLI, quick start); "!!" marks the alarm alone.
        None for a type that is not the watchdog's."""
        pgd, fgsm = f"PGD {self.pgd_acc or 0:.3f}", f"FGSM {self.fgsm_acc or 0:.3f}"
        extra = self.model_extra or {}
        lines = {
            "fgsm_pgd_gap": f"FGSM-PGD gap at {self.when}: {pgd} while {fgsm} (recorded: "
                            "common early on; the alarm waits to see whether it persists)",
            "fgsm_pgd_gap_closed": f"gap since epoch {extra.get('onset_epoch')} closed at "
                                   f"{self.when}: {pgd}, {fgsm}",
            "catastrophic_overfitting": f"!! catastrophic overfitting at {self.when}: {pgd} while "
                                        f"{fgsm} (the gap since epoch "
                                        f"{extra.get('gap_since_epoch')} persists)",
            "co_recovered": f"recovered at {self.when} from the overfitting of epoch "
                            f"{extra.get('onset_epoch')}: {pgd}, {fgsm}",
            "under_training": f"under-training at {self.when}: {pgd}, {fgsm} of clean "
                              f"{self.clean_acc or 0:.3f} (the training attack still works)",
            "accuracy_collapse": f"clean accuracy collapsed at {self.when}: "
                                 f"{self.clean_acc or 0:.3f} (best {self.best_acc:.3f})",
            "gradient_masking": f"gradient masking? at {self.when}: {pgd} on cross-entropy, "
                                f"{self.dlr_acc or 0:.3f} on DLR",
        }
        return lines.get(self.type)


class SmoothedAttack(_Open):
    acc: float
    n: int
    params: dict[str, Any] = {}


class Certification(_Open):
    """CERTIFY (Cohen et al. 2019): certified accuracy at each radius, ACR, abstentions."""

    sigma: float
    n0: int
    n: int
    alpha: float
    num_points: int
    radii: list[float]
    certified_accuracy: list[float]
    acr: float
    abstain_rate: float
    seconds: float | None = None
    empirical: SmoothedAttack | None = None

    def at(self, radius: float) -> float:
        """Certified accuracy at ``radius`` (one of ``radii``)."""
        for r, a in zip(self.radii, self.certified_accuracy, strict=True):
            if abs(r - radius) < 1e-9:
                return a
        raise KeyError(f"radius {radius} was not certified; radii: {self.radii}")


class DatasetInfo(_Open):
    name: str
    num_classes: int
    train: int
    validation: int
    test: int
    monitor: int
    shape: list[int]
    majority_share: float | None = None  # of the final suite's images: the chance level


class Verdict(_Open):
    """What the job made (contract/verdict.py): ``label`` one of ``verdict.LABELS``."""

    label: str
    reason: str
    clean_acc: float | None = None
    robust_acc: float | None = None
    chance: float | None = None


REPORT_VERSION = 1  # the report_version the runner writes and Report reads


class Report(_Open):
    report_version: int
    spec: dict[str, Any]
    environment: dict[str, Any]
    dataset: DatasetInfo
    history: list[HistoryRow]
    events: list[Event]
    final: FinalResult
    final_models: dict[str, FinalResult] = {}
    selection: dict[str, Any] | None = None
    stopped_early: dict[str, Any] | None = None
    remediations: list[dict[str, Any]] = []
    certification: Certification | None = None
    timing: dict[str, float] = {}
    artifacts: list[str] = []
    verdict: Verdict | None = None  # read from the final figures when a report lacks one

    @model_validator(mode="before")
    @classmethod
    def _verdict(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("verdict") is None and data.get("final"):
            try:
                data = {**data, "verdict": verdict(data)}
            except (KeyError, TypeError):  # malformed figures: the fields' checks say which
                pass
        return data
    finished_at: str | None = None  # RFC 3339 UTC, when the report was written

    @property
    def job_spec(self) -> JobSpec:
        """The spec as it ran, as a ``JobSpec``."""
        return JobSpec.model_validate(as_ran(self.spec))

    @property
    def models(self) -> dict[str, FinalResult]:
        """The final results per model (``last``, ``best``, ``wa``); ``final`` as the last
        model's in a report without ``final_models``."""
        return self.final_models or {"last": self.final}

    @property
    def split(self) -> str:
        """The images the final suite ran on: ``test`` or ``validation``."""
        return final_split({"spec": self.spec})

    @property
    def reach(self) -> float | None:
        """How far the final PGD's steps carry it, in ε (steps × α)."""
        return pgd_reach({"spec": self.spec})

    def events_of(self, kind: str) -> list[int]:
        """The epochs of the watchdog's ``kind`` events."""
        return [e.epoch for e in self.events if e.type == kind]

    @property
    def co_epochs(self) -> list[int]:
        """Epochs at which the watchdog saw catastrophic overfitting begin."""
        return self.events_of("catastrophic_overfitting")

    @property
    def co_at_end(self) -> bool:
        """The CO rule held at the last trained epoch (the final model is overfit), as
        opposed to an episode the run recovered from."""
        return bool(self.history) and self.history[-1].catastrophic_overfitting

    def summary(self) -> str:
        """The few lines ``bulwark run`` and ``bulwark report`` print: the verdict first."""
        f = self.final
        lines = []
        if self.verdict is not None:
            lines.append(f"verdict          {self.verdict.label}: {self.verdict.reason}")
        lines.append(f"clean accuracy   {f.clean_acc:.4f}  (n={f.n})")
        for name, r in f.attacks.items():
            lines.append(f"{name:<16} {r.acc:.4f}  (n={r.n})")
        for name, other in self.final_models.items():
            if name != f.model:
                lines.append(f"[{name} weights] clean {other.clean_acc:.4f}  " + "  ".join(
                    f"{k} {a.acc:.4f}" for k, a in other.attacks.items()))
        c = self.certification
        if c is not None:
            radii = "  ".join(f"r={r:g}: {a:.3f}" for r, a in zip(c.radii, c.certified_accuracy,
                                                                  strict=True))
            lines.append(f"certified (σ={c.sigma:g}, n={c.n}, α={c.alpha:g}, "
                         f"{c.num_points} points)  {radii}")
            lines.append(f"ACR {c.acr:.3f}   abstained {c.abstain_rate:.3f}")
            if c.empirical is not None:
                lines.append(f"smoothed PGD (ℓ2 ε={c.empirical.params.get('eps', '?')}) "
                             f"{c.empirical.acc:.4f}  (n={c.empirical.n})")
        for name, res in {f.model: f, **self.final_models}.items():
            for w in res.warnings(pgd_reach({"spec": self.spec})):
                lines.append(f"warning: {w}" + (f" [{name} weights]" if name != f.model
                                                 else ""))
        for e in self.events:
            lines.append(f"event: {e.line() or f'{e.type} at {e.when}'}")
        if self.stopped_early:
            lines.append(f"stopped early after epoch {self.stopped_early.get('epoch')} "
                         f"({self.stopped_early.get('reason')})")
        for r in self.remediations:
            lines.append(f"remediated: the alarm at epoch {r.get('epoch')}; rolled back to epoch "
                         f"{r.get('rolled_back_to')} and went on with {r.get('remedy')} "
                         f"({r.get('recipe')})")
        return "\n".join(lines)


def as_report(report: Report | dict[str, Any]) -> Report:
    """``report`` as the typed ``Report`` (a report.json's mapping is validated: a malformed
    one raises ``ValueError``)."""
    return report if isinstance(report, Report) else Report.model_validate(report)
