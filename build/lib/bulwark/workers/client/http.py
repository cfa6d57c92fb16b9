"""The Python SDK's client for the Bulwark API (torch-free; the CLI uses it too).

    client = Client()                       # $BULWARK_URL, $BULWARK_API_KEY or serve's key file
    job = client.submit("examples/quickstart/mnist-fgsm.yaml")   # a path, a dict or a JobSpec
    job.wait()                              # follows the event stream, with progress bars
    report = job.report()                   # a typed bulwark.contract.report.Report
    job.download("model.safetensors", "fgsm.safetensors")

Errors are ``ApiError`` (the HTTP status, the API's detail and what to do about it) or
``ConnectionFailed`` (naming the URL it tried).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from bulwark.contract.api import (
    TERMINAL_STATES,
    DatasetOut,
    JobList,
    JobOut,
    Leaderboard,
    ModelOut,
    SweepOut,
)
from bulwark.contract.artifacts import DOWNLOADABLE, WEIGHTS
from bulwark.contract.report import Report
from bulwark.contract.spec import JobSpec, read_spec_file

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_HOME = "bulwark-data"


class ApiError(Exception):
    def __init__(self, status: int, detail: Any, url: str = ""):
        self.status, self.detail, self.url = status, detail, url
        super().__init__(f"HTTP {status}: {format_detail(detail)}{_advice(status)}")


class ConnectionFailed(Exception):
    """The API did not answer at ``url``."""

    def __init__(self, url: str, cause: Exception):
        self.url = url
        super().__init__(f"cannot reach the Bulwark API at {url} ({cause}); is `bulwark serve` "
                         "running there? Set --url or BULWARK_URL to where it listens")


def _advice(status: int) -> str:
    if status == 401:
        return ("\nPass an API key with --key or BULWARK_API_KEY (`bulwark serve` prints one "
                "at start and keeps it in <home>/api_key; `bulwark keys create` makes more)")
    return ""


def format_detail(detail: Any) -> str:
    """FastAPI 422 details as `field.path: message` lines (no patterns, no internals)."""
    if isinstance(detail, list):
        lines = []
        for e in detail:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            if e.get("type") == "literal_error" and "ctx" in e:
                msg = f"must be one of {e['ctx'].get('expected')}, got {e.get('input')!r}"
            lines.append(f"{loc or '(body)'}: {msg}")
        return "\n".join(lines)
    return str(detail)


def normalize_url(url: str) -> str:
    """``localhost:8000`` → ``http://localhost:8000``; a trailing ``/v1`` or ``/`` is dropped
    (routes already start with /v1)."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    return url.removesuffix("/v1").rstrip("/")


def default_key(home: str | None = None) -> str | None:
    """$BULWARK_API_KEY, else the key file ``bulwark serve`` wrote in its home folder."""
    key = os.environ.get("BULWARK_API_KEY")
    if key:
        return key
    path = Path(home or os.environ.get("BULWARK_HOME", DEFAULT_HOME)) / "api_key"
    return path.read_text().strip() if path.exists() else None


def _spec_body(spec: JobSpec | dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(spec, JobSpec):
        return spec.model_dump(mode="json", exclude_unset=False)
    if isinstance(spec, dict):
        return spec
    return read_spec_file(str(spec))


@dataclass(frozen=True)
class JobEvent:
    """One server-sent event of a job: its stream id, type and payload."""

    id: str | None
    type: str
    data: dict[str, Any]


class Client:
    """The Bulwark API. ``url`` defaults to $BULWARK_URL (else http://127.0.0.1:8000), ``key``
    to $BULWARK_API_KEY (else the key file of an embedded ``bulwark serve``)."""

    def __init__(self, url: str | None = None, key: str | None = None, *,
                 timeout: float = 30.0):
        self.url = normalize_url(url or os.environ.get("BULWARK_URL") or DEFAULT_URL)
        self.key = key or default_key()
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ConnectionFailed(self.url, e) from e
        return self._json(r)

    def _json(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail, str(r.request.url))
        return r.json() if r.content else None

    # ------------------------------------------------------------------ jobs
    def submit(self, spec: JobSpec | dict[str, Any] | str | os.PathLike, *,
               idempotency_key: str | None = None) -> Job:
        """Submit a job spec (a ``JobSpec``, a mapping, or a .yaml/.json path)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        out = JobOut.model_validate(
            self.request("POST", "/v1/jobs", json=_spec_body(spec), headers=headers))
        return Job(self, out.id, out)

    def job_list(self, state: str | None = None, limit: int = 50, offset: int = 0,
                 id_prefix: str | None = None) -> JobList:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        if id_prefix:
            params["id_prefix"] = id_prefix
        return JobList.model_validate(self.request("GET", "/v1/jobs", params=params))

    def jobs(self, state: str | None = None, limit: int = 50, offset: int = 0) -> list[Job]:
        """The tenant's jobs, newest first."""
        return [Job(self, j.id, j) for j in self.job_list(state, limit, offset).items]

    def resolve(self, job_id: str) -> str:
        """The full id of the one job whose id starts with ``job_id`` (a prefix is enough)."""
        if len(job_id) == 36:
            return job_id
        page = self.job_list(id_prefix=job_id, limit=2)
        if page.total == 0:
            raise ApiError(404, f"no job of yours has an id starting with {job_id!r}")
        if page.total > 1:
            raise ApiError(409, f"{page.total} jobs have ids starting with {job_id!r}: "
                                f"{', '.join(j.id[:12] for j in page.items)}…; give more of it")
        return page.items[0].id

    def job(self, job_id: str) -> Job:
        """A job by id or unique id prefix."""
        full = self.resolve(job_id)
        return Job(self, full, JobOut.model_validate(self.request("GET", f"/v1/jobs/{full}")))

    # ------------------------------------------------------------------ models
    def upload_model(self, path: str | os.PathLike, *, arch: str | None = None,
                     num_classes: int | None = None, in_channels: int | None = None,
                     image_size: int | None = None) -> ModelOut:
        """Upload safetensors weights for evaluation-only jobs
        (``{"mode": "evaluate", "model": {"weights": "models/<id>"}}``). Fields not given are
        read from the file's metadata (Bulwark's own weights carry them)."""
        from safetensors import safe_open

        p = Path(path)
        try:
            with safe_open(str(p), framework="numpy") as f:
                meta = f.metadata() or {}
        except Exception as e:  # not a safetensors file: let the user know before uploading
            raise ValueError(f"{p}: not a safetensors file ({e})") from e
        fields = {"arch": arch or meta.get("arch"),
                  "num_classes": num_classes or meta.get("num_classes"),
                  "in_channels": in_channels or meta.get("in_channels"),
                  "image_size": image_size or meta.get("image_size")}
        missing = [k for k in ("arch", "num_classes") if fields[k] is None]
        if missing:
            raise ValueError(f"{p} has no {', '.join(missing)} in its metadata; pass them")
        with open(p, "rb") as f:
            data = {k: str(v) for k, v in fields.items() if v is not None}
            return ModelOut.model_validate(self.request(
                "POST", "/v1/models", data=data,
                files={"file": (p.name, f, "application/octet-stream")}))

    def upload_dataset(self, path: str | os.PathLike) -> DatasetOut:
        """Upload an ``.npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test``) for jobs that
        name it as ``{"dataset": {"name": "npz", "path": "datasets/<id>"}}``; the server
        reads it with numpy alone (no pickles) and answers with its sizes and classes."""
        p = Path(path)
        with open(p, "rb") as f:
            return DatasetOut.model_validate(self.request(
                "POST", "/v1/datasets", files={"file": (p.name, f, "application/octet-stream")}))

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/healthz")

    def leaderboard(self, *, dataset: str | None = None, norm: str | None = None,
                    epsilon: float | None = None, metric: str = "autoattack",
                    radius: float = 0.5, limit: int = 50) -> Leaderboard:
        """The tenant's finished jobs ranked by AutoAttack, PGD or certified accuracy."""
        params = {k: v for k, v in {"dataset": dataset, "norm": norm, "epsilon": epsilon,
                                    "metric": metric, "radius": radius,
                                    "limit": limit}.items() if v is not None}
        return Leaderboard.model_validate(self.request("GET", "/v1/leaderboard",
                                                       params=params))

    # ------------------------------------------------------------------ sweeps
    def submit_sweep(self, sweep: dict[str, Any] | str | os.PathLike) -> SweepOut:
        """Submit a sweep (a mapping, or a sweep .yaml/.json whose ``base`` may be a spec
        file beside it: it is read here and sent as a mapping)."""
        if isinstance(sweep, dict):
            body = sweep
        else:
            from bulwark.contract.sweep import load_sweep

            body = load_sweep(str(sweep)).model_dump(mode="json", exclude={"out", "variants_from"})
        return SweepOut.model_validate(self.request("POST", "/v1/sweeps", json=body))

    def sweep(self, sweep_id: str) -> SweepOut:
        return SweepOut.model_validate(self.request("GET", f"/v1/sweeps/{sweep_id}"))

    def cancel_sweep(self, sweep_id: str) -> SweepOut:
        return SweepOut.model_validate(self.request("POST", f"/v1/sweeps/{sweep_id}/cancel"))

    def wait_sweep(self, sweep_id: str, *, poll: float = 2.0,
                   timeout: float | None = None) -> SweepOut:
        """Poll until every child of the sweep is terminal; the final ``SweepOut``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (out := self.sweep(sweep_id)).terminal:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"sweep {sweep_id} is still {out.state} after {timeout} s")
            time.sleep(poll)
        return out

    # ------------------------------------------------------------------ events
    def events(self, job_id: str, last_event_id: str | None = None, *,
               retries: int = 5) -> Iterator[JobEvent]:
        """A job's server-sent events until its terminal event; reconnects (resuming from the
        last event id, so nothing is missed or repeated) when the connection drops, and waits
        its turn (Retry-After) while the tenant already holds its limit of streams."""
        failures = 0
        while True:
            try:
                headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
                with connect_sse(self.http, "GET", f"/v1/jobs/{job_id}/events",
                                 headers=headers,
                                 timeout=httpx.Timeout(30.0, read=None)) as source:
                    if source.response.status_code in (429, 503):  # too many streams open
                        wait = float(source.response.headers.get("Retry-After") or 5)
                        source.response.read()
                        if self.request("GET", f"/v1/jobs/{job_id}")["state"] in TERMINAL_STATES:
                            return
                        time.sleep(min(wait, 30.0))
                        continue
                    if source.response.status_code >= 400:
                        source.response.read()
                        self._json(source.response)
                    for sse in source.iter_sse():
                        failures = 0
                        if not sse.data:  # a keep-alive comment: httpx-sse hands it on as
                            continue  # an empty "message"; the SSE standard dispatches nothing
                        last_event_id = sse.id or last_event_id
                        yield JobEvent(sse.id or None, sse.event, sse.json())
                        if sse.event in TERMINAL_STATES:
                            return
                return  # the server closed the stream: the job is terminal
            except (httpx.TransportError, SSEError) as e:
                failures += 1
                if failures > retries:
                    raise ConnectionFailed(self.url, e) from e
                time.sleep(min(2.0 * failures, 10.0))


class Job:
    """A job on the server. ``info`` is the last state fetched; ``status()`` refreshes it."""

    def __init__(self, client: Client, job_id: str, info: JobOut | None = None):
        self.client, self.id, self.info = client, job_id, info

    def __repr__(self) -> str:
        state = self.info.state if self.info else "?"
        return f"Job({self.id[:8]}, {state})"

    @property
    def state(self) -> str | None:
        return self.info.state if self.info else None

    def status(self) -> JobOut:
        self.info = JobOut.model_validate(self.client.request("GET", f"/v1/jobs/{self.id}"))
        return self.info

    def events(self, last_event_id: str | None = None) -> Iterator[JobEvent]:
        return self.client.events(self.id, last_event_id)

    def wait(self, progress: bool = True, timeout: float | None = None) -> JobOut:
        """Follow the job's events until it is terminal; returns its final state.

        ``progress`` draws bars (epochs, each final attack, certification) on stderr.
        ``timeout`` in seconds raises ``TimeoutError`` (the job keeps running)."""
        from bulwark.workers.client.progress import ProgressView

        view = ProgressView(self.id[:8], enabled=progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if deadline is None:
                for ev in self.events():
                    view(ev.type, ev.data)
            else:
                self._wait_until(deadline, view)
        finally:
            view.close()
        return self.status()

    def _wait_until(self, deadline: float, view) -> None:
        """Poll-and-stream with a deadline: the stream is read in a thread we stop waiting on."""
        import queue
        import threading

        q: queue.Queue = queue.Queue()

        def pump() -> None:
            try:
                for ev in self.events():
                    q.put(ev)
            except Exception as e:  # surfaced in the caller's thread
                q.put(e)
            q.put(None)

        threading.Thread(target=pump, daemon=True, name=f"bulwark-events-{self.id[:8]}").start()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {self.id} still {self.status().state} after the "
                                   "timeout; it keeps running (wait again, or cancel it)")
            try:
                item = q.get(timeout=left)
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            view(item.type, item.data)

    def cancel(self) -> JobOut:
        self.info = JobOut.model_validate(
            self.client.request("POST", f"/v1/jobs/{self.id}/cancel"))
        return self.info

    def delete(self) -> None:
        self.client.request("DELETE", f"/v1/jobs/{self.id}")

    def report(self) -> Report:
        return Report.model_validate(self.report_json())

    def report_json(self) -> dict[str, Any]:
        return self.client.request("GET", f"/v1/jobs/{self.id}/report")

    def export(self, out: str | os.PathLike, fmt: str = "robustbench") -> Path:
        """The job as a RobustBench model card (``out/<name>.json``) beside its weights
        (``out/model.safetensors``, which ``bulwark.load_model`` reads back); the card's path."""
        card = self.client.request("GET", f"/v1/jobs/{self.id}/export", params={"format": fmt})
        return write_export(card, Path(out), lambda dest: self.download(WEIGHTS, dest))

    def download(self, name: str, path: str | os.PathLike | None = None) -> Path:
        """Save artifact ``name`` (one of ``bulwark.contract.artifacts.DOWNLOADABLE``) to ``path``
        (default: ``name`` in the working directory); written atomically."""
        if name not in DOWNLOADABLE:
            raise ValueError(f"{name!r} is not an artifact; choose one of "
                             f"{', '.join(DOWNLOADABLE)}")
        dest = Path(path or name)
        if dest.is_dir():
            dest = dest / name
        try:
            with self.client.http.stream("GET", f"/v1/jobs/{self.id}/artifacts/{name}") as r:
                if r.status_code >= 400:
                    r.read()
                    self.client._json(r)
                tmp = dest.with_name(dest.name + ".part")
                with open(tmp, "wb") as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)
                tmp.replace(dest)
        except httpx.TransportError as e:
            raise ConnectionFailed(self.client.url, e) from e
        return dest


def write_export(card: dict[str, Any], out: Path, fetch_weights) -> Path:
    """Write ``card`` as ``out/<name>.json`` and the weights (``fetch_weights(dest)``) as
    ``out/model.safetensors``; the card's path."""
    import re

    out.mkdir(parents=True, exist_ok=True)
    fetch_weights(out / WEIGHTS)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", str(card.get("name") or "model")).strip("-")
    path = out / f"{stem or 'model'}.json"
    path.write_text(json.dumps(card, indent=2))
    return path
