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

Every name loads on first use: torch only with ``run`` and ``load_model``, so a client-only
program never loads it. See docs/sdk.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bulwark.contract.api import JobOut as JobInfo
    from bulwark.contract.presets import presets
    from bulwark.contract.report import (
        WATCH_EVENTS,
        Certification,
        Event,
        FinalResult,
        HistoryRow,
        Report,
    )
    from bulwark.contract.spec import JobSpec, SpecError
    from bulwark.workers.client.http import ApiError, Client, ConnectionFailed, Job, JobEvent
    from bulwark.workers.engine.checkpoint import load_model
    from bulwark.workers.engine.runner import run

# Each public name and the module it lives in, imported on first use: the subpackages below
# (bulwark.service, bulwark.workers, ...) import this package first, and a torch-free service
# process must not load the SDK's HTTP client, nor any process torch, by doing so.
_HOME = {
    "JobInfo": ("bulwark.contract.api", "JobOut"),
    "presets": ("bulwark.contract.presets", "presets"),
    **{n: ("bulwark.contract.report", n) for n in (
        "WATCH_EVENTS", "Certification", "Event", "FinalResult", "HistoryRow", "Report")},
    **{n: ("bulwark.contract.spec", n) for n in ("JobSpec", "SpecError")},
    **{n: ("bulwark.workers.client.http", n) for n in (
        "ApiError", "Client", "ConnectionFailed", "Job", "JobEvent")},
    "load_model": ("bulwark.workers.engine.checkpoint", "load_model"),  # torch
    "run": ("bulwark.workers.engine.runner", "run"),  # torch
}

__all__ = ["ApiError", "Certification", "Client", "ConnectionFailed", "Event", "FinalResult",
           "HistoryRow", "Job", "JobEvent", "JobInfo", "JobSpec", "Report", "SpecError",
           "WATCH_EVENTS", "__version__", "load_model", "presets", "run"]
assert sorted(__all__) == sorted([*_HOME, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _HOME:
        module, attr = _HOME[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    if name == "__version__":
        from importlib import metadata
        return metadata.version("bulwark")
    raise AttributeError(f"module 'bulwark' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME, "__version__"])
