"""Sweeps: a base job spec crossed with a grid over spec fields (torch-free).

A sweep file::

    base: examples/quickstart/mnist-fgsm.yaml  # a spec file (relative to this file) or a mapping
    grid:                                  # dotted spec fields -> the values to try
      recipe.preset: [fgsm, n-fgsm]
      threat.epsilon: [0.1, 0.3]
      schedule.seed: [0, 1, 2]
    variants:                              # optional named overrides, each crossed with the grid
      elle-lam-100: {recipe: {preset: fgsm-elle, regularizers: [{kind: elle, lam: 100}]}}
    variants_from:                         # optional: variants another sweep file defines
      - {file: study.yaml, only: [pgd10-at]}
    stop_on_catastrophic_overfitting: false
    out: runs                              # optional: `bulwark sweep FILE` writes there

Children are the product of the variants (or the base alone) and every grid combination, in
file order; each is a complete, validated ``JobSpec``. A child's name joins the variant name
and ``field=value`` for every grid field, so folders and tables say what each child varied.
"""

from __future__ import annotations

import copy
import itertools
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from bulwark.contract.presets import merge
from bulwark.contract.report import Report, as_report
from bulwark.contract.spec import (
    JobSpec,
    SpecError,
    _Strict,
    format_validation_error,
    read_spec_file,
)

MAX_CHILDREN = 1000
MAX_INCLUDE_DEPTH = 8


class VariantsFrom(_Strict):
    file: str = Field(max_length=500, description="a sweep file, relative to this one")
    only: list[str] | None = Field(None, description="the variants to take (default: all)")


class SweepSpec(_Strict):
    base: dict[str, Any] | str = Field(description="a job spec mapping, or a spec file path")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="dotted spec field -> values, e.g. threat.epsilon")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="name -> overrides merged into the base")
    variants_from: list[VariantsFrom] = Field(
        default_factory=list,
        description="`bulwark sweep` only: variants other sweep files define, taken as written "
                    "(this file's base applies) and placed before this file's own, so one "
                    "variant is written once for every study that runs it")
    stop_on_catastrophic_overfitting: bool = Field(
        False, description="children stop training at the watchdog's first CO event and go "
                           "straight to their final evaluation")
    out: str | None = Field(
        None, max_length=500,
        description="`bulwark sweep` only: the children's folder when no --out is given, "
                    "relative to the sweep file (a study keeps its results beside it)")

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)*", key):
                raise ValueError(f"grid key {key!r}: a dotted spec field such as threat.epsilon")
            if not values:
                raise ValueError(f"grid.{key}: give at least one value")
        return v

    @field_validator("variants")
    @classmethod
    def _names(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
                raise ValueError(f"variant name {name!r}: letters, digits, '.', '_', '-' "
                                 "(at most 64)")
        return v


@dataclass(frozen=True)
class Child:
    name: str                   # folder-safe, unique within the sweep
    overrides: dict[str, Any]   # variant name and grid values, for tables
    spec: JobSpec


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if k == "recipe" and isinstance(node.get(k), str):
            node[k] = {"preset": node[k]}  # "recipe: fgsm" is short for {preset: fgsm}
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = node[k] = {}
        node = nxt
    node[keys[-1]] = copy.deepcopy(value)


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def load_sweep(path: str | Path, _depth: int = 0) -> SweepSpec:
    """A sweep file with its base file read and its ``variants_from`` taken in."""
    data = read_spec_file(str(path))
    try:
        sweep = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{path}: invalid sweep\n{format_validation_error(e)}") from e
    if isinstance(sweep.base, str):
        sweep.base = read_spec_file(str(_beside(path, sweep.base)))
    if sweep.variants_from:
        if _depth >= MAX_INCLUDE_DEPTH:
            raise SpecError(f"{path}: variants_from nests deeper than {MAX_INCLUDE_DEPTH} files "
                            "(a file that includes itself?)")
        taken: dict[str, dict[str, Any]] = {}
        for inc in sweep.variants_from:
            other = load_sweep(_beside(path, inc.file), _depth + 1).variants
            missing = [n for n in inc.only or [] if n not in other]
            if missing:
                raise SpecError(f"{path}: variants_from {inc.file} has no variant "
                                f"{', '.join(missing)} (it has {', '.join(other) or 'none'})")
            for name in inc.only or list(other):
                if name in taken or name in sweep.variants:
                    raise SpecError(f"{path}: variant {name} is defined twice "
                                    f"(variants_from {inc.file} and elsewhere)")
                taken[name] = other[name]
        sweep.variants = taken | sweep.variants
        sweep.variants_from = []
    return sweep


def _beside(path: str | Path, name: str) -> Path:
    """A file a sweep file names, relative to that file."""
    p = Path(name)
    return p if p.is_absolute() else Path(path).parent / p


def sweep_out(path: str | Path, sweep: SweepSpec) -> Path | None:
    """The folder a sweep file names for its children (``out``, relative to the file)."""
    return None if sweep.out is None else _beside(path, sweep.out)


def expand(sweep: SweepSpec) -> list[Child]:
    """Every child of the sweep as a validated JobSpec (SpecError names the failing child)."""
    if isinstance(sweep.base, str) or sweep.variants_from:
        raise SpecError("sweep.base and variants_from must be resolved first (load_sweep does)")
    variants = sweep.variants or {"": {}}
    keys = list(sweep.grid)
    combos = list(itertools.product(*(sweep.grid[k] for k in keys)))
    if len(variants) * len(combos) > MAX_CHILDREN:
        raise SpecError(f"the sweep has {len(variants) * len(combos)} children; at most "
                        f"{MAX_CHILDREN}")
    children: list[Child] = []
    for vname, override in variants.items():
        for combo in combos:
            # a part of another kind replaces the base's (an FGSM variant of an FGSM-RS base
            # keeps no clip_start); a part of the same kind is merged field by field
            data = merge(copy.deepcopy(sweep.base), override)
            for k, value in zip(keys, combo, strict=True):
                _set(data, k, value)
            if sweep.stop_on_catastrophic_overfitting:
                _set(data, "evaluation.monitor.stop_on_co", True)
            parts = ([vname] if vname else []) + [
                f"{k.rsplit('.', 1)[-1]}={_slug(v)}" for k, v in zip(keys, combo, strict=True)]
            name = "_".join(parts) or "base"
            data["name"] = name  # the child's jobs and reports carry its name
            try:
                spec = JobSpec.model_validate(data)
            except ValidationError as e:
                raise SpecError(f"sweep child {name}: invalid job spec\n"
                                f"{format_validation_error(e)}") from e
            except ValueError as e:
                raise SpecError(f"sweep child {name}: {e}") from e
            overrides = ({"variant": vname} if vname else {}) | dict(zip(keys, combo,
                                                                         strict=True))
            children.append(Child(name, overrides, spec))
    names = [c.name for c in children]
    if len(set(names)) != len(names):
        raise SpecError("two sweep children share a name; give the variants distinct names")
    return children


POOL_APART = ("name", "schedule.seed", "compute.devices", "compute.compile")


def pool_key(spec: dict[str, Any]) -> str:
    """Runs may be pooled as seeds of one method only when this is equal: a digest of the
    resolved spec apart from its name, seed and what does not change what a run computes
    (``compute.devices``, ``compute.compile``)."""
    import hashlib
    import json

    from bulwark.contract.spec import JobSpec, as_ran

    try:
        data = JobSpec.model_validate(as_ran(spec)).model_dump(mode="json")
    except ValueError:
        data = dict(as_ran(spec))
    flat = {k: v for k, v in flat_fields(data).items() if k not in POOL_APART}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]


def flat_fields(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay values)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flat_fields(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def headline(report: Report | dict[str, Any]) -> dict[str, Any]:
    """The figures a sweep table shows for one finished child (a report's JSON is read as the
    typed ``Report``: a malformed one raises ``ValueError``)."""
    rep = as_report(report)
    final, history, spec = rep.final, rep.history, rep.spec
    # the median epoch: a run paused or starved for a while (another job on its cores,
    # SIGSTOP) keeps the cost of its ordinary epochs
    per_epoch = statistics.median(h.train_seconds for h in history) if history else None
    return {
        "preset": (spec.get("recipe") or {}).get("preset"),
        "epsilon": (spec.get("threat") or {}).get("epsilon"),
        "seed": (spec.get("schedule") or {}).get("seed"),
        "clean_acc": final.clean_acc, "fgsm_acc": final.fgsm.acc if final.fgsm else None,
        "pgd_acc": final.pgd.acc if final.pgd else None,
        "autoattack_acc": final.autoattack.acc if final.autoattack else None,
        "n": final.n,
        "co_epochs": rep.co_epochs,
        "co_at_end": rep.co_at_end,
        "epochs_run": len(history),
        "monitor_pgd": [round(h.monitor.pgd_acc, 3) if h.monitor else None for h in history],
        "seconds": rep.timing.get("total"),
        "warnings": final.warnings(rep.reach),
        "verdict": rep.verdict.label if rep.verdict else None,
        "pool": pool_key(spec),
        "seconds_per_epoch": per_epoch,
        # the whole training's cost on the same terms: what a recipe's budget is compared by
        "train_seconds": per_epoch * len(history) if history else None,
    }


def sweep_state(states: list[str]) -> str:
    """A sweep's state from its children's: queued (none started), running (some not yet
    finished), then, once every child is terminal: succeeded (all), failed (any failed),
    cancelled."""
    if not states or all(s == "queued" for s in states):
        return "queued"
    if any(s not in ("succeeded", "failed", "cancelled") for s in states):
        return "running"
    if all(s == "succeeded" for s in states):
        return "succeeded"
    return "failed" if "failed" in states else "cancelled"
