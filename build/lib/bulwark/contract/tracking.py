"""Which tracking server a job logs to, and where its artifacts may land (torch-free: the API
checks a spec with it, the worker checks again and checks each server's answer).

Through the service a tenant never chooses a tracking URI: a spec *names* one of the
operator's servers (``tracking.mlflow.target``, from ``BULWARK_MLFLOW_TARGETS``) or leaves it to
the operator's default (``BULWARK_MLFLOW_URI``). And whatever the server answers, the worker
writes artifacts only through the server itself (``mlflow-artifacts:`` on the server's own host)
or under a root the operator allowed (``BULWARK_MLFLOW_ARTIFACT_ROOTS``): a server that answers
``file:///<another tenant's folder>`` gets nothing. ``bulwark run`` (the user's own machine)
takes any URI and trusts its server (``artifact_roots`` None).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bulwark.contract.spec import MLflowSpec, TrackingSpec

LOCAL_STORES = ("sqlite:///",)


def artifact_location(uri: str) -> str | None:
    """Beside a SQLite store, its artifacts go to ``mlartifacts/`` next to the database (MLflow
    would put them under the process's working directory); a server decides for itself."""
    if uri.startswith(LOCAL_STORES):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def _segments(path: str) -> list[str] | None:
    """A URI path's segments, percent-decoded; None when one climbs (``..``, ``.``)."""
    parts = [unquote(p) for p in path.split("/") if p]
    if any(p in ("..", ".") or "/" in p or "\\" in p for p in parts):
        return None
    return parts


def _under(uri: str, root: str) -> bool:
    a, r = urlsplit(uri), urlsplit(root)
    if a.scheme.lower() != r.scheme.lower() or a.netloc.lower() != r.netloc.lower():
        return False
    if a.query or a.fragment:
        return False
    sa, sr = _segments(a.path), _segments(r.path)
    if sa is None or sr is None or sa[:len(sr)] != sr:
        return False
    if a.scheme.lower() == "file":  # a symlink under the root must not lead out of it
        real, base = os.path.realpath(unquote(a.path)), os.path.realpath(unquote(r.path))
        return os.path.commonpath([real, base]) == base
    return True


def artifact_uri_problem(artifact_uri: str, tracking_uri: str,
                         roots: tuple[str, ...] | None) -> str | None:
    """Why the worker must not write artifacts to ``artifact_uri`` (a tracking server's answer),
    or None. ``roots`` None trusts the server (a local run)."""
    if roots is None:
        return None
    a = urlsplit(artifact_uri)
    if a.scheme.lower() == "mlflow-artifacts":  # proxied: the server itself stores them
        t = urlsplit(tracking_uri)
        if t.scheme.lower() in ("http", "https") and a.netloc.lower() in ("", t.netloc.lower()) \
                and not a.query and not a.fragment and _segments(a.path) is not None:
            return None
        return (f"artifact URI {artifact_uri[:300]!r}: a proxied mlflow-artifacts URI must "
                "point at the tracking server itself")
    if any(_under(artifact_uri, root) for root in roots):
        return None
    return (f"artifact URI {artifact_uri[:300]!r} is neither the server's proxied "
            "mlflow-artifacts: store nor under a root the operator allowed "
            "(BULWARK_MLFLOW_ARTIFACT_ROOTS); no artifact was written")


@dataclass(frozen=True)
class TrackingServers:
    """The operator's tracking servers: named ``targets``, the ``default`` URI, and the
    ``artifact_roots`` a server's answer must fall under (None: trust every server)."""

    targets: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None
    artifact_roots: tuple[str, ...] | None = None

    def uri_for(self, mlflow: MLflowSpec | None) -> str | None:
        """The URI a job logs to: its own ``uri`` (a local run), its named target, else the
        default; None when there is none."""
        if mlflow is not None and mlflow.uri:
            return mlflow.uri
        if mlflow is not None and mlflow.target is not None:
            return self.targets.get(mlflow.target)
        return self.default

    def api_problem(self, tracking: TrackingSpec) -> tuple[str, str, str] | None:
        """Through the API a job names one of the operator's servers or none: (field,
        message, value) of what it got wrong, or None."""
        m = tracking.mlflow
        if m is None:
            return None
        names = ", ".join(sorted(self.targets)) or "none configured"
        if m.uri is not None:
            return ("tracking.mlflow.uri", "not accepted through the API: name one of the "
                    "operator's tracking servers with tracking.mlflow.target (BULWARK_MLFLOW_"
                    f"TARGETS: {names}), or leave both out for the operator's default", m.uri)
        if m.target is not None and m.target not in self.targets:
            return ("tracking.mlflow.target", f"no tracking server named {m.target!r}: the "
                    f"operator's are {names} (BULWARK_MLFLOW_TARGETS)", m.target)
        return None

    @classmethod
    def operator(cls, targets: Mapping[str, str], default: str | None,
                 roots: list[str] | tuple[str, ...]) -> TrackingServers:
        """The service's servers: artifacts only under ``roots`` and beside the operator's own
        SQLite stores."""
        local = [loc for uri in (default, *targets.values()) if uri
                 if (loc := artifact_location(uri)) is not None]
        return cls(dict(targets), default or None, (*roots, *local))
