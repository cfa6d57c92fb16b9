"""/docs in a real browser (Debian's Chromium driven by Playwright), with no internet: Swagger UI's
assets come from the API itself, every operation renders, Authorize knows the key schemes,
and no request fails or leaves localhost."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from bulwark.service.app import create_app
from bulwark.store.settings import Settings
from tests.service_stack import app_in_thread

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    home = tmp_path_factory.mktemp("docs")
    app = create_app(Settings(home=home, redis_url="redis://127.0.0.1:1/0",
                              reaper_enabled=False))
    with app_in_thread(app) as url:
        yield url


def test_openapi_declares_auth_and_error_responses(api):
    schema = httpx.get(f"{api}/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    assert any(s.get("scheme") == "bearer" for s in schemes.values())
    submit = schema["paths"]["/v1/jobs"]["post"]
    assert {"401", "409", "413", "422", "429"} <= set(submit["responses"])
    assert submit["security"], "the route says it needs a key"
    cancel = schema["paths"]["/v1/jobs/{job_id}/cancel"]["post"]
    assert {"401", "404", "409"} <= set(cancel["responses"])
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_docs_render_offline_in_chromium(api, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (scripts/install.sh installs it where "
                    "apt is available)")
    from playwright.sync_api import sync_playwright

    schema = httpx.get(f"{api}/openapi.json").json()
    n_ops = sum(len(ops) for ops in schema["paths"].values())
    failed: list[str] = []
    outside: list[str] = []
    console_errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1600})

        def route(r):
            if r.request.url.startswith(api):
                r.continue_()
            else:  # the machine has no internet: anything not from the API is a CDN leak
                outside.append(r.request.url)
                r.abort()

        page.route("**/*", route)
        page.on("requestfailed", lambda req: failed.append(req.url))
        page.on("response", lambda res: failed.append(f"{res.status} {res.url}")
                if res.status >= 400 else None)
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.goto(f"{api}/docs", wait_until="networkidle")
        page.wait_for_selector(".opblock", timeout=20_000)
        assert page.locator(".opblock").count() == n_ops
        assert "Bulwark" in page.locator(".title").first.inner_text()
        page.locator("button.authorize").first.click()
        modal = page.locator(".modal-ux")
        modal.wait_for(timeout=5_000)
        text = modal.inner_text()
        assert "HTTPBearer" in text and "X-API-Key" in text
        page.locator(".modal-ux .close-modal").first.click()
        # BULWARK_DOC_SCREENSHOTS=1 refreshes the picture in docs/img
        img = REPO / "docs" / "img" if os.environ.get("BULWARK_DOC_SCREENSHOTS") else tmp_path
        img.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(img / "api-docs.png"))
        browser.close()
    assert outside == [], f"requests that left the API (a CDN?): {outside}"
    assert failed == [], f"failed requests: {failed}"
    assert console_errors == [], console_errors
