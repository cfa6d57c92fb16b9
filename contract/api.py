"""The shapes of the API's responses (torch-free): the service builds them from its store, the
SDK and CLI read them. The request body of ``POST /v1/jobs`` is ``bulwark.contract.spec.JobSpec``.

Every timestamp carries its zone (RFC 3339); accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES: tuple[JobState, ...] = ("succeeded", "failed", "cancelled")


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """A naive time is UTC (SQLite hands back naive values): give it its zone."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


UTCDateTime = Annotated[dt.datetime, AfterValidator(_utc)]


class ErrorOut(BaseModel):
    """Error body: ``detail`` is a message, or for 422 a list of {loc, msg, type}."""

    detail: str | list[dict[str, Any]]


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str


class JobOut(BaseModel):
    """A job as the API shows it. ``progress`` holds the last epoch, phase and monitor figures
    while the job runs (no phase once it is terminal)."""

    id: str
    state: JobState
    name: str | None
    attempt: int
    max_attempts: int
    cancel_requested: bool
    progress: dict[str, Any]
    error: str | None
    artifacts: list[ArtifactOut]
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    finished_at: UTCDateTime | None
    spec: dict[str, Any]
    model_id: str | None = None
    verdict: dict[str, Any] | None = Field(
        None, description="what a succeeded job made: {label, reason} (docs/methods.md, "
                          "\"Verdicts\"); the state only says it ran")

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class SweepChildOut(BaseModel):
    """One child of a sweep: its name and grid values, its job, and — once it succeeded —
    the headline figures of its report (clean, FGSM, PGD and AutoAttack accuracy, CO epochs,
    seconds per epoch)."""

    name: str
    overrides: dict[str, Any]
    job_id: str
    state: JobState
    error: str | None = None
    figures: dict[str, Any] | None = None


class SweepOut(BaseModel):
    """A sweep: ``state`` is queued (none started), running, or — once every child is
    terminal — succeeded (all), failed (any failed) or cancelled; ``counts`` per state."""

    id: str
    name: str | None
    state: JobState
    counts: dict[str, int]
    children: list[SweepChildOut]
    created_at: UTCDateTime
    spec: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class SweepList(BaseModel):
    items: list[SweepOut]
    total: int
    limit: int
    offset: int


class LeaderboardRow(BaseModel):
    rank: int | None            # within its threat (dataset, norm, ε); None: not robust
    job_id: str
    name: str | None
    dataset: str
    norm: str
    epsilon: float
    method: str | None
    arch: str
    metric: str                 # the figure ranked: "autoattack-standard", "pgd50-10", ...
    robust_acc: float
    clean_acc: float
    n: int                      # evaluation points
    seconds: float | None       # the job's wall time
    suite: str = ""             # the final suite's attacks
    standard: bool = False      # AutoAttack standard on the whole test set
    verdict: str | None = None  # contract/verdict.py: only "robust" is ranked
    radius: float | None = None  # a certified figure's radius ...
    sigma: float | None = None   # ... and the noise level it was certified at
    split: str = "test"          # evaluation.final.split: validation figures are never ranked


class Leaderboard(BaseModel):
    """The tenant's finished jobs by one figure, grouped by threat (dataset, norm, ε: ℓ2 and
    ℓ∞ never share a ranking), each group ranked best first among jobs whose verdict is
    ``robust`` (a certified figure, a guarantee, always); the others follow their group with
    no rank. ``skipped`` counts the matching jobs whose report lacks the figure."""

    metric: Literal["autoattack", "pgd", "certified"]
    radius: float | None
    items: list[LeaderboardRow]
    skipped: int


class ModelOut(BaseModel):
    id: str
    arch: str
    meta: dict[str, Any]
    sha256: str
    size: int
    created_at: UTCDateTime


class DatasetOut(BaseModel):
    """An uploaded dataset: ``meta`` holds train / test sizes, image shape and classes."""

    id: str
    meta: dict[str, Any]
    sha256: str
    size: int
    created_at: UTCDateTime


class Health(BaseModel):
    """``ok`` | ``degraded`` (no live worker) | ``down`` (database or Redis unreachable)."""

    status: Literal["ok", "degraded", "down"]
    database: bool
    redis: bool
    workers: int = 0
