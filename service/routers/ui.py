"""The dashboard: a static page and a script over this API (the key stays in the browser tab);
nothing is fetched from anywhere else."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
UI_ASSETS = ("app.js", "app.css")
UI_CSP = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                     "frame-src blob:; style-src 'self' 'unsafe-inline'; "
                                     "frame-ancestors 'none'",
          "Cache-Control": "no-cache"}


@router.get("/ui")
def ui() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", headers=UI_CSP)


@router.get("/ui/{name}")
def ui_asset(name: str) -> FileResponse:
    if name not in UI_ASSETS:
        raise HTTPException(404, f"no {name!r} in the dashboard")
    return FileResponse(UI_DIR / name, headers=UI_CSP)
