"""The job store: every state change of a job is one short transaction on its row.

Workers never trust the broker: a task runs only after it wins the compare-and-set lease in
``claim``; a duplicate delivery finds the row taken and does nothing. Every query a client can
reach is filtered by tenant.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bulwark.store.db import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    STATES,
    SUCCEEDED,
    TERMINAL,
    ApiKey,
    Attempt,
    Job,
    Sweep,
    Tenant,
    UploadedDataset,
    UploadedModel,
    utcnow,
)

KEY_PREFIX = "bwk_"


def devices_of(spec: dict[str, Any]) -> int:
    """The device count a job spec (as dumped) needs: compute.devices, 0 for "all"."""
    n = (spec.get("compute") or {}).get("devices", 1)
    return 0 if n == "all" else int(n)


class StoreError(Exception):
    status = 400


class NotFound(StoreError):
    status = 404


class Conflict(StoreError):
    status = 409


class QuotaExceeded(StoreError):
    status = 429


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def request_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    owner: str
    spec: dict[str, Any]
    tenant_id: str
    model_id: str | None


def make_engine(url: str) -> Engine:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    return create_engine(url, **kwargs)


def private_sqlite(url: str) -> None:
    """A SQLite file that does not exist yet is created 0600 before SQLite opens it (its -wal
    and -shm files take its mode): it holds key digests and every tenant's jobs."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:") \
            or u.database.startswith("file:"):
        return
    db = Path(u.database)
    if not db.exists():
        db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:  # another process made it meanwhile
            pass


class Store:
    """``clock``: the store's "now" for leases, heartbeats, staleness and end times (UTC,
    timezone-aware; the wall clock by default, a controllable one in tests)."""

    def __init__(self, url: str, *, clock: Callable[[], dt.datetime] = utcnow):
        self.url = url
        self.clock = clock
        private_sqlite(url)
        self.engine = make_engine(url)
        if url.startswith("sqlite"):
            from sqlalchemy import event

            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(conn, _record):  # WAL: readers never block the writer
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
                conn.isolation_level = None  # SQLAlchemy's begin event below opens transactions

            @event.listens_for(self.engine, "begin")
            def _sqlite_begin(conn):
                # IMMEDIATE takes the write lock up front: a read-then-write transaction
                # (the quota check) cannot race another, nor fail to upgrade its WAL snapshot
                immediate = conn.get_execution_options().get("sqlite_immediate")
                conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # transactions that may write (SQLite: BEGIN IMMEDIATE; see session())
        self._writer_sessions = sessionmaker(
            self.engine.execution_options(sqlite_immediate=True), expire_on_commit=False)

    # ------------------------------------------------------------------ plumbing
    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        cfg.attributes["engine"] = self.engine
        command.upgrade(cfg, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction that may write (SQLite: BEGIN IMMEDIATE, so it waits for the write
        lock up front instead of failing to upgrade a stale read snapshot)."""
        with self._writer_sessions.begin() as s:
            yield s

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction (SQLite: a plain deferred BEGIN; readers never wait)."""
        with self._sessions.begin() as s:
            yield s

    def ping(self) -> bool:
        with self.engine.connect() as c:
            c.exec_driver_sql("SELECT 1")
        return True

    # ------------------------------------------------------------------ tenants and keys
    def create_api_key(self, tenant_id: str) -> str:
        """A new key for ``tenant_id`` (created if new). Only its hash is stored."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.session() as s:
            if s.get(Tenant, tenant_id) is None:
                s.add(Tenant(id=tenant_id))
                s.flush()
            s.add(ApiKey(tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:10]))
        return key

    def list_api_keys(self, tenant_id: str | None = None) -> list[ApiKey]:
        """Every key (or one tenant's), newest first: prefix, tenant, created, revoked."""
        with self.reading() as s:
            q = select(ApiKey).order_by(ApiKey.created_at.desc())
            if tenant_id is not None:
                q = q.where(ApiKey.tenant_id == tenant_id)
            rows = list(s.scalars(q).all())
            for r in rows:
                s.expunge(r)
            return rows

    def rotate_api_key(self, prefix: str) -> tuple[ApiKey, str]:
        """A new key for the tenant of the key ``prefix`` names, and that key revoked (in one
        transaction): returns (the revoked row, the new key)."""
        old = self._find_key(prefix)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.session() as s:
            row = s.get(ApiKey, old.id)
            row.revoked = True
            s.add(ApiKey(tenant_id=row.tenant_id, key_hash=hash_key(key), prefix=key[:10]))
            s.flush()
            s.expunge(row)
        return row, key

    def _find_key(self, prefix: str) -> ApiKey:
        probe = prefix[:10]
        with self.reading() as s:
            rows = [r for r in s.scalars(select(ApiKey).where(ApiKey.prefix.startswith(
                probe, autoescape=True))).all() if r.prefix.startswith(probe)]
            if len(prefix) > 10:  # a whole key: match its digest
                rows = [r for r in rows if r.key_hash == hash_key(prefix)]
            if not rows:
                raise NotFound(f"no API key starts with {prefix!r}")
            if len(rows) > 1:
                raise Conflict(f"{len(rows)} keys start with {prefix!r}; give more of the key")
            s.expunge(rows[0])
            return rows[0]

    def revoke_api_key(self, prefix: str) -> ApiKey:
        """Revoke the one key whose printed prefix (or full key) starts with ``prefix``."""
        found = self._find_key(prefix)
        with self.session() as s:
            row = s.get(ApiKey, found.id)
            row.revoked = True
            s.flush()
            s.expunge(row)
            return row

    def authenticate(self, key: str) -> str | None:
        """The tenant of ``key``, or None."""
        digest = hash_key(key)
        with self.reading() as s:
            row = s.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).first()
            if row is None or row.revoked or not secrets.compare_digest(row.key_hash, digest):
                return None
            return row.tenant_id

    # ------------------------------------------------------------------ client side
    def create_job(self, tenant_id: str, spec: dict[str, Any], *, max_attempts: int,
                   max_queued: int, idempotency_key: str | None = None,
                   model_id: str | None = None) -> tuple[Job, bool]:
        """Insert a queued job. Returns (job, created). Same idempotency key + same body
        returns the existing job (created False); a different body raises Conflict.

        Atomic under concurrency on both databases: the tenant's row is locked first
        (PostgreSQL: ``FOR UPDATE``; SQLite: the transaction begins IMMEDIATE, holding the
        write lock), so N racing submissions never leave more than ``max_queued`` queued.
        Racing requests with one Idempotency-Key: the losers of the unique-constraint race
        get the winner's job."""
        digest = request_hash({"spec": spec, "model_id": model_id})
        try:
            return self._create_job(tenant_id, spec, digest, max_attempts=max_attempts,
                                    max_queued=max_queued, idempotency_key=idempotency_key,
                                    model_id=model_id)
        except IntegrityError:
            if not idempotency_key:
                raise
            with self.reading() as s:  # another request with this key committed first
                return self._replay(s, tenant_id, idempotency_key, digest), False

    @staticmethod
    def _replay(s: Session, tenant_id: str, key: str, digest: str) -> Job | None:
        old = s.scalars(select(Job).where(Job.tenant_id == tenant_id,
                                          Job.idempotency_key == key)).first()
        if old is not None:
            if old.request_hash != digest:
                raise Conflict("Idempotency-Key was already used with a different body")
            s.expunge(old)
        return old

    def _create_job(self, tenant_id: str, spec: dict[str, Any], digest: str, *,
                    max_attempts: int, max_queued: int, idempotency_key: str | None,
                    model_id: str | None) -> tuple[Job, bool]:
        with self.session() as s:
            s.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
            if idempotency_key:
                old = self._replay(s, tenant_id, idempotency_key, digest)
                if old is not None:
                    return old, False
            job = Job(tenant_id=tenant_id, spec=spec, name=spec.get("name"), state=QUEUED,
                      max_attempts=max_attempts, devices=devices_of(spec),
                      idempotency_key=idempotency_key, request_hash=digest, model_id=model_id,
                      progress={}, artifacts=[])
            s.add(job)
            s.flush()
            queued = s.scalar(select(func.count()).select_from(Job).where(
                Job.tenant_id == tenant_id, Job.state == QUEUED))
            if queued > max_queued:
                raise QuotaExceeded(f"tenant has {queued - 1} queued jobs; the limit is "
                                    f"{max_queued}")
            return job, True

    def create_sweep(self, tenant_id: str, sweep: dict[str, Any],
                     children: list[tuple[str, dict[str, Any], dict[str, Any]]], *,
                     max_attempts: int, max_queued: int,
                     model_ids: list[str | None] | None = None) -> tuple[Sweep, list[Job]]:
        """Insert a sweep and its children (name, overrides, spec), queued, in one
        transaction: all of them or none. The tenant's queued-job quota counts every child
        (the tenant row is locked as in ``create_job``)."""
        model_ids = model_ids or [None] * len(children)
        with self.session() as s:
            s.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
            queued = s.scalar(select(func.count()).select_from(Job).where(
                Job.tenant_id == tenant_id, Job.state == QUEUED))
            if queued + len(children) > max_queued:
                raise QuotaExceeded(f"the sweep has {len(children)} jobs and the tenant has "
                                    f"{queued} queued; the limit is {max_queued} queued")
            row = Sweep(tenant_id=tenant_id, name=sweep.get("name"), spec=sweep, children=[])
            s.add(row)
            s.flush()
            jobs = []
            for (name, _overrides, spec), model_id in zip(children, model_ids, strict=True):
                job = Job(tenant_id=tenant_id, spec=spec, name=name, state=QUEUED,
                          max_attempts=max_attempts, devices=devices_of(spec),
                          model_id=model_id, sweep_id=row.id,
                          request_hash=request_hash({"spec": spec, "model_id": model_id}),
                          progress={}, artifacts=[])
                s.add(job)
                jobs.append(job)
            s.flush()
            row.children = [{"name": name, "overrides": overrides, "job_id": job.id}
                            for (name, overrides, _), job in zip(children, jobs, strict=True)]
            s.flush()
            for x in (row, *jobs):
                s.expunge(x)
            return row, jobs

    def get_sweep(self, tenant_id: str | None, sweep_id: str) -> tuple[Sweep, list[Job]]:
        """The sweep and its children's rows in grid order (a deleted child is missing)."""
        with self.reading() as s:
            row = self._owned(s, Sweep, tenant_id, sweep_id)
            jobs = {j.id: j for j in s.scalars(select(Job).where(Job.sweep_id == sweep_id))}
            for x in (row, *jobs.values()):
                s.expunge(x)
            return row, [jobs[c["job_id"]] for c in row.children if c["job_id"] in jobs]

    def list_sweeps(self, tenant_id: str, *, limit: int = 50,
                    offset: int = 0) -> tuple[list[Sweep], int]:
        with self.reading() as s:
            q = select(Sweep).where(Sweep.tenant_id == tenant_id)
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = s.scalars(q.order_by(Sweep.created_at.desc(), Sweep.id)
                             .limit(limit).offset(offset)).all()
            for r in rows:
                s.expunge(r)
            return list(rows), int(total or 0)

    @staticmethod
    def _owned(s: Session, cls: type[Job] | type[UploadedModel] | type[UploadedDataset]
               | type[Sweep], tenant_id: str | None, row_id: str):
        """The row, if it belongs to ``tenant_id`` (None: any tenant, for workers); another
        tenant's row is reported exactly like a missing one."""
        row = s.get(cls, row_id)
        if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
            what = {Job: "job", UploadedModel: "model", UploadedDataset: "dataset",
                    Sweep: "sweep"}[cls]
            raise NotFound(f"{what} {row_id} not found")
        return row

    def _read(self, cls, tenant_id: str | None, row_id: str):
        """One row of ``cls`` owned by ``tenant_id`` (any tenant's with None), detached."""
        with self.reading() as s:
            row = self._owned(s, cls, tenant_id, row_id)
            s.expunge(row)
            return row

    def get_job(self, tenant_id: str | None, job_id: str) -> Job:
        return self._read(Job, tenant_id, job_id)

    def get_job_or_none(self, job_id: str) -> Job | None:
        """Any tenant's job, for workers; None once deleted."""
        with self.reading() as s:
            job = s.get(Job, job_id)
            if job is not None:
                s.expunge(job)
            return job

    def list_jobs(self, tenant_id: str, *, state: str | None = None,
                  id_prefix: str | None = None, limit: int = 50,
                  offset: int = 0) -> tuple[list[Job], int]:
        with self.reading() as s:
            q = select(Job).where(Job.tenant_id == tenant_id)
            if state:
                q = q.where(Job.state == state)
            if id_prefix:
                q = q.where(Job.id.startswith(id_prefix.lower(), autoescape=True))
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = s.scalars(q.order_by(Job.created_at.desc(), Job.id)
                             .limit(limit).offset(offset)).all()
            for r in rows:
                s.expunge(r)
            return list(rows), int(total or 0)

    def request_cancel(self, tenant_id: str, job_id: str) -> Job:
        """Queued → cancelled at once; running → cancel flag for the trainer to honour."""
        now = self.clock()
        with self.session() as s:
            job = self._owned(s, Job, tenant_id, job_id)
            if job.state == QUEUED:
                job.state, job.finished_at, job.cancel_requested = CANCELLED, now, True
            elif job.state == RUNNING:
                job.cancel_requested = True
            s.flush()
            s.expunge(job)
            return job

    def delete_job(self, tenant_id: str, job_id: str) -> Job:
        with self.session() as s:
            job = self._owned(s, Job, tenant_id, job_id)
            if job.state not in TERMINAL:
                raise Conflict(f"job {job_id} is {job.state}; cancel it first")
            s.delete(job)
            return job

    def mark_enqueued(self, job_id: str) -> None:
        """The broker accepted the job's message (the outbox mark)."""
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.state == QUEUED)
                      .values(enqueued_at=self.clock())
                      .execution_options(synchronize_session=False))

    def unsent(self, *, older_than: float) -> list[tuple[str, int]]:
        """Queued jobs whose message the broker never accepted (the send failed, or the
        process died between commit and send), unchanged for ``older_than`` seconds: (id,
        attempt) to send again. A duplicate message is harmless (the lease decides)."""
        cutoff = self.clock() - dt.timedelta(seconds=older_than)
        with self.reading() as s:
            return [(r.id, r.attempt) for r in s.execute(
                select(Job.id, Job.attempt).where(Job.state == QUEUED,
                                                  Job.enqueued_at.is_(None),
                                                  Job.updated_at < cutoff))]

    def sent_before(self, *, older_than: float) -> list[tuple[str, int]]:
        """Queued jobs whose message the broker accepted more than ``older_than`` seconds ago:
        (id, attempt), for the reaper to check against the broker's own list."""
        cutoff = self.clock() - dt.timedelta(seconds=older_than)
        with self.reading() as s:
            return [(r.id, r.attempt) for r in s.execute(
                select(Job.id, Job.attempt).where(Job.state == QUEUED,
                                                  Job.enqueued_at < cutoff))]

    @staticmethod
    def _never_sent() -> tuple:
        """Rows just created whose first message has not reached the broker."""
        return Job.state == QUEUED, Job.enqueued_at.is_(None), Job.attempt == 0

    def discard_unsent(self, tenant_id: str, job_id: str) -> None:
        """Remove a just-created job whose message could not be sent (the submit fails)."""
        with self.session() as s:
            s.execute(delete(Job).where(Job.id == job_id, Job.tenant_id == tenant_id,
                                        *self._never_sent())
                      .execution_options(synchronize_session=False))

    def discard_sweep(self, tenant_id: str, sweep_id: str) -> None:
        """Remove a just-created sweep none of whose messages could be sent."""
        with self.session() as s:
            s.execute(delete(Job).where(Job.sweep_id == sweep_id, Job.tenant_id == tenant_id,
                                        *self._never_sent())
                      .execution_options(synchronize_session=False))
            s.execute(delete(Sweep).where(Sweep.id == sweep_id, Sweep.tenant_id == tenant_id)
                      .execution_options(synchronize_session=False))

    def count_by_state(self) -> dict[str, int]:
        with self.reading() as s:
            rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        out = dict.fromkeys(STATES, 0)
        out.update({state: int(n) for state, n in rows})
        return out

    # ------------------------------------------------------------------ uploaded models
    def add_model(self, tenant_id: str, *, arch: str, meta: dict[str, Any], path: str,
                  sha256: str, size: int, model_id: str) -> UploadedModel:
        with self.session() as s:
            row = UploadedModel(id=model_id, tenant_id=tenant_id, arch=arch, meta=meta,
                                path=path, sha256=sha256, size=size)
            s.add(row)
            s.flush()
            s.expunge(row)
            return row

    def add_dataset(self, tenant_id: str, *, meta: dict[str, Any], path: str, sha256: str,
                    size: int, dataset_id: str) -> UploadedDataset:
        with self.session() as s:
            row = UploadedDataset(id=dataset_id, tenant_id=tenant_id, meta=meta, path=path,
                                  sha256=sha256, size=size)
            s.add(row)
            s.flush()
            s.expunge(row)
            return row

    def get_dataset(self, tenant_id: str | None, dataset_id: str) -> UploadedDataset:
        return self._read(UploadedDataset, tenant_id, dataset_id)

    def get_model(self, tenant_id: str | None, model_id: str) -> UploadedModel:
        return self._read(UploadedModel, tenant_id, model_id)

    # ------------------------------------------------------------------ worker side
    def claim(self, job_id: str, owner: str, *, stale_after: float,
              max_running: Callable[[str], int] | None = None,
              devices: int | None = None) -> Claim | None:
        """The lease for the job this delivery runs, or None when there is nothing to run.

        A broker message is a token, the database decides what it runs: ``job_id`` itself
        when it is running with a heartbeat older than ``stale_after`` seconds (a redelivery
        after a lost worker takes it over), else the fairest queued job (``pick``) among the
        tenants under their running cap ``max_running(tenant)`` (0: no cap). Compare-and-set:
        a duplicate delivery finds the job taken; on PostgreSQL the chosen tenant's row is
        locked, so racing workers never pass its cap. ``devices``: the worker's device count;
        only jobs whose ``compute.devices`` fits are considered (None: every job)."""
        fit = self._fits(devices)
        taken = self._take(job_id, owner, stale_after=stale_after, fit=fit)
        if taken is not None:
            return taken
        excluded: set[str] = set()
        for _ in range(8):  # each try is its own short transaction (no lock is held across)
            with self.session() as s:
                tenant = self._fairest_tenant(s, max_running, excluded, fit)
                if tenant is None:
                    return None
                s.execute(select(Tenant.id).where(Tenant.id == tenant).with_for_update())
                cap = max_running(tenant) if max_running else 0
                if cap and self._running(s, tenant) >= cap:  # another worker got there first
                    excluded.add(tenant)
                    continue
                candidate = s.scalar(select(Job.id).where(*self._claimable(), *fit,
                                                          Job.state == QUEUED,
                                                          Job.tenant_id == tenant)
                                     .order_by(Job.created_at, Job.id).limit(1))
                claim = None if candidate is None else self._lease(s, candidate, owner, QUEUED)
                if claim is not None:
                    s.execute(update(Tenant).where(Tenant.id == tenant)
                              .values(last_claimed_at=self.clock())
                              .execution_options(synchronize_session=False))
                    return claim
        return None

    @staticmethod
    def _claimable():
        return (Job.attempt < Job.max_attempts, Job.cancel_requested.is_(False))

    @staticmethod
    def _fits(devices: int | None) -> tuple:
        return () if devices is None else (Job.devices <= devices,)

    @staticmethod
    def _running(s: Session, tenant: str) -> int:
        return int(s.scalar(select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant, Job.state == RUNNING)) or 0)

    def _fairest_tenant(self, s: Session, max_running: Callable[[str], int] | None,
                        excluded: set[str], fit: tuple = ()) -> str | None:
        """Fair share: of the tenants with claimable queued jobs and a free slot under their
        cap, the one running the fewest jobs; ties go to the one served longest ago (never
        served first), then to the oldest waiting job. Within a tenant, first in first out."""
        waiting = s.execute(select(Job.tenant_id, func.min(Job.created_at))
                            .where(*self._claimable(), *fit, Job.state == QUEUED)
                            .group_by(Job.tenant_id)).all()
        if not waiting:
            return None
        tenants = [t for t, _ in waiting if t not in excluded]
        running = dict(s.execute(select(Job.tenant_id, func.count()).where(
            Job.state == RUNNING, Job.tenant_id.in_(tenants)).group_by(Job.tenant_id)).all())
        served = dict(s.execute(select(Tenant.id, Tenant.last_claimed_at)
                                .where(Tenant.id.in_(tenants))).all())
        oldest = dict(waiting)
        never = dt.datetime.min.replace(tzinfo=dt.UTC)

        def aware(t: dt.datetime | None) -> dt.datetime:  # SQLite returns naive UTC times
            return never if t is None else t if t.tzinfo else t.replace(tzinfo=dt.UTC)

        free = [t for t in tenants
                if not (max_running and 0 < max_running(t) <= running.get(t, 0))]
        if not free:
            return None
        return min(free, key=lambda t: (running.get(t, 0), aware(served.get(t)),
                                        aware(oldest[t]), t))

    def _take(self, job_id: str, owner: str, *, stale_after: float,
              fit: tuple = ()) -> Claim | None:
        """Take over ``job_id`` when it is running on a stale lease (a lost worker)."""
        stale = self.clock() - dt.timedelta(seconds=stale_after)
        with self.session() as s:
            return self._lease(s, job_id, owner, RUNNING, Job.heartbeat_at < stale, *fit)

    def _lease(self, s: Session, job_id: str, owner: str, state: str, *extra) -> Claim | None:
        now = self.clock()
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, *self._claimable(), Job.state == state, *extra)
            .values(state=RUNNING, lease_owner=owner, heartbeat_at=now, error=None,
                    attempt=Job.attempt + 1, started_at=func.coalesce(Job.started_at, now))
            .execution_options(synchronize_session=False))
        if res.rowcount != 1:
            return None
        job = s.get(Job, job_id)
        # taking over a stale lease: the attempt that held it is lost, as the reaper says
        s.execute(update(Attempt).where(Attempt.job_id == job_id, Attempt.ended_at.is_(None))
                  .values(ended_at=now, outcome="lost")
                  .execution_options(synchronize_session=False))
        s.add(Attempt(job_id=job_id, attempt=job.attempt, owner=owner, started_at=now))
        return Claim(job.id, job.attempt, owner, dict(job.spec), job.tenant_id, job.model_id)

    def heartbeat(self, job_id: str, owner: str, progress: dict[str, Any] | None = None
                  ) -> tuple[bool, bool]:
        """Refresh the lease. Returns (still_owner, cancel_requested)."""
        values: dict[str, Any] = {"heartbeat_at": self.clock()}
        if progress is not None:
            values["progress"] = progress
        with self.session() as s:
            res = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                              Job.state == RUNNING).values(**values)
                            .execution_options(synchronize_session=False))
            cancel = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
            return res.rowcount == 1, bool(cancel)

    def finish(self, job_id: str, owner: str, state: str, *, error: str | None = None,
               artifacts: list[dict[str, Any]] | None = None,
               progress: dict[str, Any] | None = None) -> bool:
        """Terminal (or back to queued for a retry) transition, only by the lease owner;
        ``progress`` replaces the row's (a succeeded job's carries its verdict)."""
        assert state in (SUCCEEDED, FAILED, CANCELLED, QUEUED)
        values: dict[str, Any] = {"state": state, "error": error, "lease_owner": None}
        if state != QUEUED:
            values["finished_at"] = self.clock()
        else:
            values["enqueued_at"] = None  # to be sent again
        if artifacts is not None:
            values["artifacts"] = artifacts
        if progress is not None:
            values["progress"] = progress
        with self.session() as s:
            res = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                              Job.state == RUNNING).values(**values)
                            .execution_options(synchronize_session=False))
            s.execute(update(Attempt).where(Attempt.job_id == job_id, Attempt.owner == owner,
                                            Attempt.ended_at.is_(None))
                      .values(ended_at=self.clock(), outcome=state)
                      .execution_options(synchronize_session=False))
            return res.rowcount == 1

    def release_worker(self, worker: str, reason: str) -> list[tuple[str, int]]:
        """A stopping worker's running jobs back to ``queued`` (lease owners ``worker/...``):
        the attempt is ``interrupted`` and not counted (the job did nothing wrong). Returns
        (id, attempt) of each, to be sent again."""
        now = self.clock()
        with self.session() as s:
            rows = s.scalars(select(Job).where(
                Job.state == RUNNING,
                Job.lease_owner.startswith(worker + "/", autoescape=True))
                .with_for_update()).all()
            out = []
            for job in rows:
                job.state, job.lease_owner, job.enqueued_at = QUEUED, None, None
                job.attempt, job.error = job.attempt - 1, reason
                s.execute(update(Attempt).where(Attempt.job_id == job.id,
                                                Attempt.ended_at.is_(None))
                          .values(ended_at=now, outcome="interrupted")
                          .execution_options(synchronize_session=False))
                out.append((job.id, job.attempt))
            return out

    def note_error(self, job_id: str, owner: str, error: str) -> None:
        """The lease owner's account of a crash (kept in ``error`` for the retry decision)."""
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner)
                      .values(error=error[:2000]).execution_options(synchronize_session=False))

    def reap(self, *, stale_after: float) -> dict[str, list[str]]:
        """Running jobs whose heartbeat went stale: back to ``queued`` while attempts remain
        (to be re-enqueued), else ``failed``; ``cancelled`` when a cancel was pending."""
        stale = self.clock() - dt.timedelta(seconds=stale_after)
        out: dict[str, list[str]] = {QUEUED: [], FAILED: [], CANCELLED: []}
        with self.session() as s:
            rows = s.scalars(select(Job).where(Job.state == RUNNING, Job.heartbeat_at < stale)
                             .with_for_update(skip_locked=True)).all()
            for job in rows:
                if job.cancel_requested:
                    job.state, job.finished_at = CANCELLED, self.clock()
                    job.error = "cancelled; the worker stopped heartbeating"
                elif job.attempt >= job.max_attempts:
                    job.state, job.finished_at = FAILED, self.clock()
                    job.error = f"worker lost {job.attempt} times (max_attempts)"
                else:
                    job.state, job.enqueued_at = QUEUED, None
                out[job.state].append(job.id)
                job.lease_owner = None
                s.execute(update(Attempt).where(Attempt.job_id == job.id,
                                                Attempt.ended_at.is_(None))
                          .values(ended_at=self.clock(), outcome="lost")
                          .execution_options(synchronize_session=False))
        return out

    def attempts(self, job_id: str) -> list[Attempt]:
        with self.reading() as s:
            rows = s.scalars(select(Attempt).where(Attempt.job_id == job_id)
                             .order_by(Attempt.id)).all()
            for r in rows:
                s.expunge(r)
            return list(rows)
