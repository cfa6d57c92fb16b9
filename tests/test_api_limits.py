"""The API refuses work past the operator's limits with a 422 that says the estimate and the
limit, per tenant, before anything is stored or queued (a real uvicorn, in-process)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from bulwark.service.app import create_app
from bulwark.store.settings import Settings
from bulwark.workers.client.serve import free_port
from tests.service_stack import tiny_spec

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    home = tmp_path_factory.mktemp("limits")
    app = create_app(Settings(home=home, redis_url="redis://127.0.0.1:1/0", reaper_enabled=False,
                              tenant_limits={"tight": {"max_job_tflop": 1e-4}}))
    keys = {t: app.state.store.create_api_key(t) for t in ("roomy", "tight")}
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            httpx.get(f"{url}/openapi.json", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    yield {t: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"})
           for t, k in keys.items()}
    server.should_exit = True


def test_a_century_of_compute_is_a_422_naming_estimate_and_limit(api):
    spec = {**tiny_spec(), "dataset": {"name": "cifar10"},
            "model": {"arch": "wide_resnet", "depth": 70, "widen_factor": 20},
            "evaluation": {"final": {"pgd": {"steps": 10_000, "restarts": 100}}}}
    r = api["roomy"].post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    msg = r.json()["detail"][0]["msg"]
    assert "TFLOP" in msg and "at most 2e+07 TFLOP" in msg
    assert api["roomy"].get("/v1/jobs").json()["total"] == 0, "nothing stored"


def test_limits_are_per_tenant(api):
    r = api["tight"].post("/v1/jobs", json=tiny_spec(epochs=50))
    assert r.status_code == 422 and "at most 0.0001 TFLOP" in r.json()["detail"][0]["msg"]


def test_field_bounds_reject_absurd_counts(api):
    for bad in ({"dataset": {"name": "mnist", "train_limit": 10**18}},
                {"evaluation": {"final": {"n": 10**12}}}):
        r = api["roomy"].post("/v1/jobs", json={**tiny_spec(), **bad})
        assert r.status_code == 422 and "less than or equal to" in r.text


def test_resolve_answers_a_spec_with_its_sources_and_bad_text_with_4xx(api):
    c = api["roomy"]
    r = c.post("/v1/specs/resolve", content="dataset: {name: mnist}\nrecipe: n-aaer\n"
               "threat: {epsilon: 0.3}\n", headers={"Content-Type": "application/yaml"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["spec"]["schedule"]["optimizer"] == "adam"
    assert any(s["field"] == "recipe.regularizers.aaer" for s in body["sources"])
    r = c.post("/v1/specs/resolve", content="threat: {epsilon: 7}",
               headers={"Content-Type": "application/yaml"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "threat"]
    assert c.post("/v1/specs/resolve", content="[unclosed").status_code == 400
    assert c.post("/v1/specs/resolve", content=b"\xff\xfe").status_code == 400
    # JSON's \\u escapes may decode to lone surrogates, which UTF-8 cannot carry: still a 4xx
    lone = '{"a\\ud97fb": ["\\udb1e"], "threat": {"epsilon": "\\udead"}}'
    r = c.post("/v1/specs/resolve", content=lone, headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
