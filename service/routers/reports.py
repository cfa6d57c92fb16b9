"""A job's results: its report, its artifacts, its RobustBench card; the tenant's leaderboard
and a comparison of several jobs."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse

from bulwark.contract.api import Leaderboard, LeaderboardRow
from bulwark.contract.export import leaderboard_row, rank, robustbench_card
from bulwark.contract.sweep import headline
from bulwark.service.deps import Services, Svc, Tenant, unprocessable
from bulwark.service.schemas import errors
from bulwark.store.artifacts import job_key
from bulwark.store.db import Job

router = APIRouter(tags=["jobs"])

# a report (an artifact, /v1/compare) is one self-contained page: no script may run in it,
# nothing is fetched, and no other site may frame it
REPORT_CSP = {"Content-Security-Policy": "default-src 'none'; img-src data:; style-src "
                                         "'unsafe-inline'; frame-ancestors 'none'; sandbox"}


def finished_report(svc: Services, job: Job) -> dict[str, Any]:
    found = svc.job_report(job)
    if found is None:
        raise HTTPException(404, f"job {job.id} has no report yet (state: {job.state})")
    return found


@router.get("/v1/jobs/{job_id}/report", responses=errors(401, 404))
def report(job_id: str, tenant_id: Tenant, svc: Svc) -> dict[str, Any]:
    return finished_report(svc, svc.store.get_job(tenant_id, job_id))


@router.get("/v1/jobs/{job_id}/artifacts/{name}", responses=errors(401, 404))
def artifact(job_id: str, name: str, tenant_id: Tenant, svc: Svc) -> Response:
    job = svc.store.get_job(tenant_id, job_id)
    listed = {a["name"]: a for a in job.artifacts or []}
    if name not in listed:  # only names from the job's own list: no user paths
        raise HTTPException(404, f"job {job_id} has no artifact {name!r}; "
                                 f"it has {sorted(listed)}")
    key, checksum = f"{job_key(tenant_id, job_id)}/{name}", listed[name]["sha256"]
    headers = {"X-Checksum-SHA256": checksum, **REPORT_CSP}
    if not svc.blobs.remote:
        return FileResponse(svc.blobs.local(key), filename=name, headers=headers)
    size, chunks = svc.blobs.open(key)  # streamed from the bucket, never spooled here
    return StreamingResponse(chunks, media_type="application/octet-stream", headers={
        **headers, "Content-Length": str(size),
        "Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/v1/jobs/{job_id}/export", responses=errors(401, 404, 422))
def export(job_id: str, tenant_id: Tenant, svc: Svc,
           fmt: Annotated[Literal["robustbench"], Query(alias="format")] = "robustbench"
           ) -> dict[str, Any]:
    """A finished job as a RobustBench model card (its fields, plus threat model,
    training recipe, evaluation and the weights' digest); the weights are the job's
    ``model.safetensors`` artifact."""
    job = svc.store.get_job(tenant_id, job_id)
    report_ = finished_report(svc, job)
    weights = {a["name"]: a for a in job.artifacts or []}.get("model.safetensors")
    return robustbench_card(report_, job_id=job.id,
                            weights_sha256=weights["sha256"] if weights else None)


@router.get("/v1/leaderboard", response_model=Leaderboard, responses=errors(401, 422))
def leaderboard(tenant_id: Tenant, svc: Svc, dataset: str | None = None,
                norm: Literal["linf", "l2"] | None = None,
                epsilon: Annotated[float | None, Query(gt=0, le=64)] = None,
                metric: Literal["autoattack", "pgd", "certified"] = "autoattack",
                radius: Annotated[float, Query(ge=0, le=64)] = 0.5,
                limit: Annotated[int, Query(ge=1, le=500)] = 50) -> Leaderboard:
    """The tenant's succeeded jobs (the newest 500) ranked by AutoAttack accuracy, PGD
    accuracy or certified accuracy at ``radius``; ties by clean accuracy, then time."""
    jobs, _ = svc.store.list_jobs(tenant_id, state="succeeded", limit=500)
    rows, skipped = [], 0
    for job in jobs:
        t = job.spec.get("threat") or {}
        if (dataset and (job.spec.get("dataset") or {}).get("name") != dataset) or (
                norm and t.get("norm") != norm) or (
                epsilon is not None and not math.isclose(t.get("epsilon", -1), epsilon,
                                                          rel_tol=1e-6)):
            continue
        rep = svc.job_report(job)
        row = leaderboard_row(rep, metric, radius) if rep else None
        if row is None:
            skipped += 1
            continue
        rows.append({**row, "job_id": job.id})
    items = [LeaderboardRow(**r) for r in rank(rows)[:limit]]
    return Leaderboard(metric=metric, radius=radius if metric == "certified" else None,
                       items=items, skipped=skipped)


@router.get("/v1/compare", response_class=HTMLResponse, responses=errors(401, 404, 422))
def compare_jobs(tenant_id: Tenant, svc: Svc,
                 jobs: Annotated[str, Query(description="comma-separated job ids",
                                            max_length=37 * 100)]) -> HTMLResponse:
    """``compare.html`` for the tenant's finished jobs: the table and figures of
    `bulwark compare` (mean ± std over seeds per method and ε, CO runs)."""
    from bulwark.contract.compare import render as render_compare

    ids = [j for j in jobs.split(",") if j]
    if len(ids) < 1:
        raise unprocessable(["query", "jobs"], "name at least one job id", jobs)
    rows = []
    for job_id in ids:
        job = svc.store.get_job(tenant_id, job_id)
        rep = svc.job_report(job)
        rows.append({"name": job.name or job.id[:8], "state": job.state,
                     **({"error": job.error} if job.error else {}),
                     # the spec names what differs where two jobs are not seeds of one
                     **(headline(rep) if rep else {}), "spec": job.spec})
    return HTMLResponse(render_compare(rows, f"Comparison of {len(rows)} jobs"),
                        headers=REPORT_CSP)
