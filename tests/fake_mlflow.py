"""A hostile MLflow tracking server, as a process of its own: it speaks the few REST calls
MLflow's client makes for a run (experiments get-by-name / create, runs create / get / update /
log-batch / set-tag, the proxied artifact upload) and answers ``runs/create`` with whatever
artifact URI it was told to (``POST /control {"artifact_uri": ...}``), such as another
tenant's job folder. ``GET /calls`` lists what it was asked; uploaded artifacts are kept in
memory (``GET /uploads``), never written to disk.

    python tests/fake_mlflow.py PORT
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

STATE: dict = {"artifact_uri": "mlflow-artifacts:/0/run-1/artifacts", "calls": [],
               "uploads": {}, "experiments": {}}
LOCK = threading.Lock()
API = "/api/2.0/mlflow/"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts/"


def run_info(run_id: str = "run-1") -> dict:
    return {"run_id": run_id, "run_uuid": run_id, "experiment_id": "0", "run_name": "fake",
            "status": "RUNNING", "start_time": int(time.time() * 1000),
            "artifact_uri": STATE["artifact_uri"], "lifecycle_stage": "active",
            "user_id": "fake"}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        body = self._body() if method in ("POST", "PUT", "PATCH") else b""
        with LOCK:
            STATE["calls"].append([method, path])
        if path == "/control" and method == "POST":
            STATE.update(json.loads(body))
            return self._answer(200, {})
        if path == "/calls":
            return self._answer(200, {"calls": STATE["calls"]})
        if path == "/uploads":
            return self._answer(200, {k: len(v) for k, v in STATE["uploads"].items()})
        if path.startswith(ARTIFACTS) and method == "PUT":
            STATE["uploads"][path.removeprefix(ARTIFACTS)] = body
            return self._answer(200, {})
        if not path.startswith(API):
            return self._answer(404, {"error_code": "ENDPOINT_NOT_FOUND"})
        call = path.removeprefix(API)
        if call == "experiments/get-by-name":
            name = (query.get("experiment_name") or [""])[0]
            if name not in STATE["experiments"]:
                return self._answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                                          "message": f"no experiment {name!r}"})
            return self._answer(200, {"experiment": {
                "experiment_id": STATE["experiments"][name], "name": name,
                "lifecycle_stage": "active", "artifact_location": STATE["artifact_uri"]}})
        if call == "experiments/create":
            name = json.loads(body)["name"]
            STATE["experiments"].setdefault(name, str(len(STATE["experiments"])))
            return self._answer(200, {"experiment_id": STATE["experiments"][name]})
        if call in ("runs/create", "runs/get"):
            return self._answer(200, {"run": {"info": run_info(), "data": {}}})
        if call == "runs/update":
            return self._answer(200, {"run_info": {**run_info(), "status": "FINISHED"}})
        return self._answer(200, {})  # log-batch, set-tag, ...

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
