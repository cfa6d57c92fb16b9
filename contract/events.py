"""Every kind of event a job's stream carries, with what its data holds: the one list the
publishers are held to (``bulwark.store.events.Events.publish`` refuses any other kind) and
docs/api.md's events table follows (tests/test_events_list.py). Torch-free."""

from __future__ import annotations

from bulwark.contract.report import WATCH_EVENTS

_WATCH = ("a watchdog event (epoch, figures, the rule; docs/methods.md, \"The watchdog\")")

EVENT_KINDS: dict[str, str] = {
    "queued": "the job (or a sweep's child: sweep_id) is in the queue",
    "running": "a worker won the lease: attempt, worker",
    "started": "training starts: epochs, start epoch, device",
    "resumed": "training goes on from a checkpoint: the epoch",
    "epoch": "the report's history row: lr, training ε, train loss/acc, monitor figures, "
             "method metrics, seconds",
    **{kind: _WATCH for kind in WATCH_EVENTS},
    "stopped_early": "on_catastrophic_overfitting: stop ended training at an alarm: epoch, reason",
    "remediated": "on_catastrophic_overfitting: remediate acted: epoch, remedy, rolled_back_to, "
                  "the new recipe",
    "diverged": "a non-finite loss or gradient: epoch, step, the terms, lr, skipped steps",
    "phase": "final_evaluation (model, attack, n), certification or smoothed_attack begins",
    "evaluation": "one attack's progress: attack, model, done, total, ETA",
    "certification": "certification's progress: done, total, samples/s, ETA",
    "finished": "report.json is written: the final figures and the verdict",
    "tracking_failed": "the experiment tracker refused or was unreachable: tracker, while, "
                       "error; training goes on",
    "cancel_requested": "the cancel flag is set; the trainer stops at its next step",
    "retrying": "back to the queue (a crash, a stopped worker, a stale heartbeat): error, "
                "attempt",
    "succeeded": "the job's end: the final figures; the last event",
    "failed": "the job's end: the error; the last event",
    "cancelled": "the job's end; the last event",
}
