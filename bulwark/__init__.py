"""Bulwark's Python SDK: the public names, re-exported from where they live.

    import bulwark

    client = bulwark.Client()                    # $BULWARK_URL / $BULWARK_API_KEY / serve's key
    job = client.submit({"dataset": {"name": "mnist"}, "recipe": "n-fgsm",
                         "threat": {"epsilon": 0.3}})
    job.wait()
    report = job.report()                        # bulwark.Report: typed, with .summary()
    job.download("model.safetensors", "model.safetensors")
    model = bulwark.load_model("model.safetensors")   # a plain torch nn.Module

    report = bulwark.run("examples/quickstart/mnist-fgsm.yaml", out="runs/fgsm")  # local

Torch is imported only by ``run`` and ``load_model`` (on first use), so a client-only
program never loads it. See docs/sdk.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from contract.api import JobOut as JobInfo
from contract.presets import presets
from contract.report import WATCH_EVENTS, Certification, Event, FinalResult, HistoryRow, Report
from contract.spec import JobSpec, SpecError
from workers.client.http import ApiError, Client, ConnectionFailed, Job, JobEvent

if TYPE_CHECKING:
    from workers.engine.checkpoint import load_model
    from workers.engine.runner import run

__all__ = ["ApiError", "Certification", "Client", "ConnectionFailed", "Event", "FinalResult",
           "HistoryRow", "Job", "JobEvent", "JobInfo", "JobSpec", "Report", "SpecError",
           "WATCH_EVENTS",
           "__version__", "load_model", "presets", "run"]


def __getattr__(name: str) -> Any:  # torch-backed names load on first use
    if name == "run":
        from workers.engine.runner import run
        return run
    if name == "load_model":
        from workers.engine.checkpoint import load_model
        return load_model
    if name == "__version__":
        from importlib import metadata
        return metadata.version("bulwark")
    raise AttributeError(f"module 'bulwark' has no attribute {name!r}")
