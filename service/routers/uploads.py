"""/v1/models and /v1/datasets: a tenant's own weights and data, checked as they arrive."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile

from bulwark.contract.api import DatasetOut, ModelOut
from bulwark.contract.spec import MAX_CLASSES
from bulwark.service.deps import Svc, Tenant
from bulwark.service.schemas import dataset_out, errors, model_out
from bulwark.store.uploads import UploadRejected, store_dataset, store_upload

router = APIRouter()


@router.post("/v1/models", tags=["models"], response_model=ModelOut, status_code=201,
             responses=errors(400, 401, 413, 422))
async def upload_model(tenant_id: Tenant, svc: Svc, file: Annotated[UploadFile, File()],
                       arch: Annotated[str, Form()],
                       num_classes: Annotated[int, Form(ge=2, le=MAX_CLASSES)],
                       in_channels: Annotated[int, Form(ge=1, le=4)] = 3,
                       image_size: Annotated[int, Form(ge=4, le=512)] = 32) -> ModelOut:
    try:
        row = await asyncio.to_thread(
            store_upload, svc.store, svc.settings, svc.blobs, tenant_id, file.file, arch=arch,
            meta={"num_classes": num_classes, "in_channels": in_channels,
                  "image_size": image_size})
    except UploadRejected as e:
        raise HTTPException(e.status, str(e)) from e
    return model_out(row)


@router.post("/v1/datasets", tags=["datasets"], response_model=DatasetOut, status_code=201,
             responses=errors(400, 401, 413, 422))
async def upload_dataset(tenant_id: Tenant, svc: Svc,
                         file: Annotated[UploadFile, File()]) -> DatasetOut:
    """An ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (images uint8 or
    float in [0, 1], NHWC or NHW; integer labels), read with numpy alone (no pickles).
    Jobs use it as ``{"dataset": {"name": "npz", "path": "datasets/<id>"}}``."""
    try:
        row = await asyncio.to_thread(store_dataset, svc.store, svc.settings, svc.blobs,
                                      tenant_id, file.file)
    except UploadRejected as e:
        raise HTTPException(e.status, str(e)) from e
    return dataset_out(row)
