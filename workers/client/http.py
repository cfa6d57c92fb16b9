"""A small HTTP client for the Bulwark API (used by the CLI; torch-free)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    def __init__(self, status: int, detail: Any):
        super().__init__(f"HTTP {status}: {format_detail(detail)}")
        self.status, self.detail = status, detail


def format_detail(detail: Any) -> str:
    """FastAPI 422 details as `field.path: message` lines."""
    if isinstance(detail, list):
        lines = []
        for e in detail:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            lines.append(f"{loc or '(body)'}: {msg}")
        return "\n".join(lines)
    return str(detail)


def default_key(home: str = "bulwark-data") -> str | None:
    key = os.environ.get("BULWARK_API_KEY")
    if key:
        return key
    path = Path(os.environ.get("BULWARK_HOME", home)) / "api_key"
    return path.read_text().strip() if path.exists() else None


class Client:
    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 30.0):
        self.url = (url or os.environ.get("BULWARK_URL") or DEFAULT_URL).rstrip("/")
        self.key = key or default_key()
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _json(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)
        return r.json() if r.content else None

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self.http.post("/v1/jobs", json=spec, headers=headers))

    def jobs(self, state: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        params = {"limit": limit, "offset": offset, **({"state": state} if state else {})}
        return self._json(self.http.get("/v1/jobs", params=params))

    def job(self, job_id: str) -> dict:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict:
        return self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))

    def delete(self, job_id: str) -> None:
        self._json(self.http.delete(f"/v1/jobs/{job_id}"))

    def report(self, job_id: str) -> dict:
        return self._json(self.http.get(f"/v1/jobs/{job_id}/report"))

    def download(self, job_id: str, name: str, dest: Path) -> Path:
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as r:
            if r.status_code >= 400:
                r.read()
                self._json(r)
            tmp = dest.with_name(dest.name + ".part")
            with open(tmp, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
            tmp.replace(dest)
        return dest

    def events(self, job_id: str, last_event_id: str | None = None
               ) -> Iterator[tuple[str | None, str, dict]]:
        """Server-sent events as (id, type, data) until the server closes the stream."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                              timeout=httpx.Timeout(30.0, read=None)) as r:
            if r.status_code >= 400:
                r.read()
                self._json(r)
            event_id, kind, data = None, "message", []
            for line in r.iter_lines():
                if line == "":
                    if data:
                        yield event_id, kind, json.loads("\n".join(data))
                    event_id, kind, data = None, "message", []
                elif line.startswith(":"):
                    continue
                else:
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "id":
                        event_id = value
                    elif field == "event":
                        kind = value
                    elif field == "data":
                        data.append(value)
