"""The one way in for new jobs, used by ``POST /v1/jobs`` and ``POST /v1/sweeps``: each spec
is admitted (its uploads are the tenant's, its work within the tenant's limits, its devices
offered by some worker), then the stored rows enter the queue through the lifecycle."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import HTTPException

from bulwark.contract.cost import check_limits, estimate
from bulwark.contract.datasets import api_dataset_problem
from bulwark.contract.spec import JobSpec
from bulwark.service.deps import Services, unprocessable
from bulwark.store.db import Job
from bulwark.store.lifecycle import QueueUnavailable
from bulwark.store.queue import most_devices
from bulwark.store.store import StoreError

MODEL_REF = re.compile(r"models/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def admit(svc: Services, tenant_id: str, spec: JobSpec) -> str | None:
    """422 unless ``spec`` may run here for this tenant; returns its uploaded model's id."""
    model_id = uploaded_model_id(svc, spec, tenant_id)
    check_cost(svc, spec, tenant_id, uploaded_dataset_id(svc, spec, tenant_id))
    check_devices(svc, spec)
    return model_id


def enqueue(svc: Services, jobs: Iterable[Job], *,
            discard: Callable[[], None], data: dict[str, Any] | None = None) -> None:
    """Stored rows into the queue; 503 (and nothing kept) when the broker is unreachable."""
    try:
        svc.lifecycle.queued(jobs, data=data, discard=discard)
    except QueueUnavailable as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "10"}) from None


def uploaded_model_id(svc: Services, spec: JobSpec, tenant_id: str) -> str | None:
    """``model.weights`` must name one of the tenant's uploads: never a server path."""
    ref = spec.model.weights
    if ref is None:
        return None
    m = MODEL_REF.fullmatch(ref)
    row = None
    if m:
        try:
            row = svc.store.get_model(tenant_id, m.group(1))
        except StoreError:
            row = None
    if row is None:
        raise unprocessable(["body", "model", "weights"], "must be 'models/<id>' of a model "
                            "you uploaded with POST /v1/models", ref)
    if row.arch != spec.model.arch:
        raise unprocessable(["body", "model", "arch"], f"the uploaded model is a {row.arch}",
                            spec.model.arch)
    return row.id


def check_cost(svc: Services, spec: JobSpec, tenant_id: str, dataset_id: str | None) -> None:
    """422 when the job's estimated work passes the tenant's limits (nothing stored)."""
    shape = None
    if dataset_id is not None:
        m = svc.store.get_dataset(tenant_id, dataset_id).meta
        c, h, _w = m["shape"]
        shape = (m["train"], m["test"], c, h)
    problem = check_limits(estimate(spec, shape), svc.settings.limits(tenant_id))
    if problem is not None:
        raise unprocessable(["body"], problem, None)


def check_devices(svc: Services, spec: JobSpec) -> None:
    """422 when the job asks for more devices than any worker of this service has ever
    offered one job: it would wait in the queue for ever, holding a quota slot."""
    want = spec.compute.devices
    if want == "all" or want <= 1:
        return
    try:
        most = most_devices(svc.events.redis)
    except Exception:  # Redis is away: the send that follows answers 503
        return
    if want > most:
        raise unprocessable(["body", "compute", "devices"], (
            f"no worker of this service offers {want} devices to one job (the most any "
            f"has offered: {most or 'none yet'}; BULWARK_WORKER_DEVICES on the worker); "
            f"ask for 1..{max(most, 1)} or 'all'"), want)


def uploaded_dataset_id(svc: Services, spec: JobSpec, tenant_id: str) -> str | None:
    """Through the API a job names a dataset the server has, or one the tenant uploaded:
    never a server path, never a download (both are `bulwark run` features)."""
    problem, dataset_id = api_dataset_problem(spec.dataset), None
    if problem is None and spec.dataset.name == "npz":
        try:
            dataset_id = svc.store.get_dataset(tenant_id, spec.dataset.path.split("/", 1)[1]).id
        except StoreError:
            problem = ("path", "must be 'datasets/<id>' of a dataset you uploaded with "
                       "POST /v1/datasets", spec.dataset.path)
    if problem is not None:
        field, msg, value = problem
        raise unprocessable(["body", "dataset", field], msg, value)
    tracking = svc.servers.api_problem(spec.tracking)  # an uploaded dataset's job too
    if tracking is not None:
        field, msg, value = tracking
        raise unprocessable(["body", *field.split(".")], msg, value)
    return dataset_id
