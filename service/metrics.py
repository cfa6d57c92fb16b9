"""Prometheus metrics computed from the job table at scrape time (the DB is the truth)."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from sqlalchemy import select

from bulwark.store.db import Job


class JobCollector:
    def __init__(self, store, recent: int = 1000):
        self.store, self.recent = store, recent

    def collect(self):
        by_state = GaugeMetricFamily("bulwark_jobs", "Jobs by state", labels=["state"])
        for state, n in self.store.count_by_state().items():
            by_state.add_metric([state], n)
        yield by_state
        with self.store.session() as s:
            rows = s.execute(select(Job.created_at, Job.started_at, Job.finished_at)
                             .where(Job.started_at.is_not(None))
                             .order_by(Job.created_at.desc()).limit(self.recent)).all()
        waits = [(st - cr).total_seconds() for cr, st, _ in rows]
        runs = [(fin - st).total_seconds() for _, st, fin in rows if fin is not None]
        yield SummaryMetricFamily("bulwark_job_queue_wait_seconds",
                                  f"Queue wait of the last {self.recent} started jobs",
                                  count_value=len(waits), sum_value=sum(waits))
        yield SummaryMetricFamily("bulwark_job_run_seconds",
                                  f"Run time of the last {self.recent} finished jobs",
                                  count_value=len(runs), sum_value=sum(runs))
