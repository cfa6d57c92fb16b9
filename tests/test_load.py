"""A bounded load burst on the real stack (bench/load_burst.py): N tiny jobs from 20
concurrent clients over 5 tenants, 2 workers. Every job is acknowledged, succeeds and runs
exactly once; the latency figures are printed, never asserted. N is BULWARK_LOAD_JOBS (24
here, so CI stays short; docs/reliability.md records a 200-job run)."""

from __future__ import annotations

import os
import sys

import pytest

from tests.service_stack import REPO

sys.path.insert(0, str(REPO / "bench"))

from load_burst import run  # noqa: E402

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane


def test_a_burst_of_jobs_is_accounted_for_and_run_exactly_once(tmp_path, capsys):
    jobs = int(os.environ.get("BULWARK_LOAD_JOBS", "24"))
    out = run(jobs, clients=20, tenants=5, workers=2, home=tmp_path)
    with capsys.disabled():
        print(f"\nload burst: {out['submit']} submit, {out['list_while_running']} list, "
              f"{out['jobs_per_minute']} jobs/min")
    assert out["refused"] == [] and out["acknowledged"] == jobs
    assert out["not_terminal"] == 0, "the burst drains by itself"
    assert out["succeeded"] == jobs and out["run_exactly_once"] == jobs
