"""Specs before they run: the presets' compositions and a spec resolved as it would run."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import ValidationError

from bulwark.contract.presets import preset_sources
from bulwark.contract.presets import presets as preset_table
from bulwark.contract.spec import JobSpec, SpecError, parse_spec_text
from bulwark.service.deps import Tenant, unprocessable
from bulwark.service.errors import json_safe, short_errors
from bulwark.service.schemas import errors

router = APIRouter(tags=["jobs"])


@router.get("/v1/presets", responses=errors(401, 422))
def list_presets(tenant_id: Tenant, dataset: str = "cifar10",
                 epsilon: Annotated[str, Query(max_length=32)] = "8/255") -> dict[str, Any]:
    """Every preset's composition at ``epsilon`` for ``dataset``'s family, with the source
    of each value (what `bulwark presets` and `bulwark validate` print)."""
    try:
        return preset_table(epsilon, dataset=dataset)
    except ValueError as e:
        raise unprocessable(["query", "epsilon"], str(e), epsilon) from None


@router.post("/v1/specs/resolve", responses=errors(400, 401, 413, 422),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/yaml": {"schema": {"type": "string"}},
                 "application/json": {"schema": {"type": "object"}}}}})
async def resolve_spec(request: Request, tenant_id: Tenant) -> dict[str, Any]:
    """A job spec as YAML or JSON text, resolved as it would run (presets applied), with
    the source of every value its preset supplied — what `bulwark validate` prints.
    Nothing is stored; submit the returned ``spec`` with ``POST /v1/jobs``."""
    raw = await request.body()
    # off the event loop: a large body takes a while to read, and other tenants wait
    return await asyncio.to_thread(resolve_text, raw)


def resolve_text(raw: bytes) -> dict[str, Any]:
    """``POST /v1/specs/resolve``'s work: the spec in ``raw`` (YAML or JSON, from a tenant:
    no anchors or aliases, bounded nesting) resolved, with each preset value's source."""
    try:
        data = parse_spec_text(raw.decode("utf-8"), "the request body", plain=True)
    except UnicodeDecodeError:
        raise HTTPException(400, "the request body is not UTF-8 text") from None
    except SpecError as e:
        raise HTTPException(400, json_safe(str(e))) from None
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:  # 422 field by field, located in the body as POST's
        raise HTTPException(422, short_errors([{**err, "loc": ["body", *err["loc"]]}
                                               for err in e.errors(include_url=False)])
                            ) from None
    return {"spec": spec.model_dump(mode="json"),
            "sources": [{"field": f, "value": v, "source": src}
                        for f, v, src in preset_sources(spec)]}
