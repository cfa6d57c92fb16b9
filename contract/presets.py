"""Named presets: each paper's method as one setting of the recipe parts (torch-free).

A preset supplies a recipe and a schedule with the papers' per-epsilon defaults
(ALGORITHMS.md); whatever the user writes overrides it field by field. Regularizers and the
adversary are matched by ``kind``: ``{"kind": "elle", "lam": 2000}`` changes ELLE's λ and keeps
the rest; naming another adversary kind replaces the adversary.

The per-ε tables were tuned for ℓ∞ on CIFAR-10 with ε in /255 units. For an ε between table
entries, GradAlign's λ is interpolated log-linearly (the table grows geometrically) and AAER
takes the nearest tabulated ε. For ℓ2 threats the 8/255 entries are used.
"""

from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Callable
from typing import Any

from contract.units import parse_epsilon

# Fast single-step AT recipe (ELLE, N-FGSM, AAER scripts): 30 epochs, cyclic lr 0 -> 0.2 -> 0.
FAST_SCHEDULE: dict[str, Any] = {
    "epochs": 30, "batch_size": 128, "momentum": 0.9, "weight_decay": 5e-4,
    "lr": {"kind": "cyclic", "lr_max": 0.2, "peak": 0.5},
}
# Multi-step AT recipe (AWP, ADR): 200 epochs, lr 0.1, x0.1 at 50% and 75% (epochs 100, 150).
LONG_SCHEDULE: dict[str, Any] = {
    "epochs": 200, "batch_size": 128, "momentum": 0.9, "weight_decay": 5e-4,
    "lr": {"kind": "piecewise", "lr_max": 0.1, "milestones": [0.5, 0.75], "gamma": 0.1},
}

# ADR (config/cifar10/*.gin): τ 2.5 → 2.0 and λ 0.7 → 0.95 with SGD; 1.5 / 0.85 with AWP.
ADR_SGD = {"kind": "adr", "decay": 0.995, "tau_high": 2.5, "tau_low": 2.0, "lam_low": 0.7,
           "lam_high": 0.95}
ADR_AWP = {**ADR_SGD, "tau_low": 1.5, "lam_high": 0.85}
ADR_SCHEDULE = {**LONG_SCHEDULE, "nesterov": True}

# GradAlign λ by ε (in /255), from the ELLE repo's tuned baselines; 2.0 for ε >= 16.
_GRADALIGN = [(2, 0.036), (4, 0.063), (6, 0.112), (8, 0.2), (10, 0.356), (12, 0.632),
              (14, 1.124), (16, 2.0)]
# AAER (λ2, λ3) by ε (in /255), from the AAER README.
_AAER_RS = {8: (2.5, 1.5), 12: (5.0, 2.5), 16: (7.0, 3.25), 32: (6.0, 1.5)}
_AAER_N = {8: (1.5, 0.15), 12: (5.0, 0.55), 16: (8.5, 1.5), 32: (3.5, 0.7)}


def eps255(epsilon: float, norm: str) -> float:
    return epsilon * 255.0 if norm == "linf" else 8.0


def elle_lambda(e: float) -> float:
    """ELLE constant λ (run_elle_cifar10.sh): 1000 (ε ≤ 8), 5000 (10–20), 10000 (≥ 22)."""
    if e <= 8 + 1e-6:
        return 1000.0
    if e <= 20 + 1e-6:
        return 5000.0
    return 10000.0


def gradalign_lambda(e: float) -> float:
    xs = [x for x, _ in _GRADALIGN]
    if e <= xs[0]:
        return _GRADALIGN[0][1]
    if e >= xs[-1]:
        return _GRADALIGN[-1][1]
    i = bisect.bisect_right(xs, e)
    (x0, y0), (x1, y1) = _GRADALIGN[i - 1], _GRADALIGN[i]
    w = (e - x0) / (x1 - x0)
    return round(math.exp((1 - w) * math.log(y0) + w * math.log(y1)), 6)


def aaer_lambdas(e: float, table: dict[int, tuple[float, float]]) -> tuple[float, float]:
    nearest = min(table, key=lambda k: (abs(k - e), k))
    return table[nearest]


def aaer(e: float, table: dict[int, tuple[float, float]]) -> dict:
    lam2, lam3 = aaer_lambdas(e, table)
    return {"kind": "aaer", "lam1": 1.0, "lam2": lam2, "lam3": lam3}


def _single(adversary: dict, *regs: dict) -> Callable[[float], dict]:
    def build(e: float) -> dict:
        return {
            "recipe": {"adversary": adversary, "loss": {"kind": "ce"},
                       "regularizers": [r(e) if callable(r) else r for r in regs]},
            "schedule": FAST_SCHEDULE,
        }
    return build


def _multi(loss: dict, *, awp: dict | None = None, labels: dict | None = None,
           weight_average: dict | None = None, schedule: dict | None = None
           ) -> Callable[[float], dict]:
    def build(e: float) -> dict:
        recipe = {"adversary": {"kind": "pgd", "steps": 10, "alpha": 0.25, "restarts": 1},
                  "loss": loss, "regularizers": [], "weight_perturbation": awp,
                  "labels": labels or {"kind": "hard"}, "weight_average": weight_average}
        return {"recipe": recipe, "schedule": schedule or LONG_SCHEDULE}
    return build


FGSM = {"kind": "fgsm", "alpha": 1.0}
FGSM_RS = {"kind": "fgsm_rs", "alpha": 1.25}
N_FGSM = {"kind": "n_fgsm", "k": 2.0, "alpha": 1.0}
ELLE_A = {"kind": "elle_a", "lam_max": 4000.0, "sensitivity": 2.0, "decay": 0.99}

PRESETS: dict[str, Callable[[float], dict]] = {
    "standard": _single({"kind": "none"}),
    "fgsm": _single(FGSM),
    "fgsm-rs": _single(FGSM_RS),
    "n-fgsm": _single(N_FGSM),
    "fgsm-elle": _single(FGSM, lambda e: {"kind": "elle", "lam": elle_lambda(e)}),
    "fgsm-elle-a": _single(FGSM, ELLE_A),
    "n-fgsm-elle-a": _single(N_FGSM, ELLE_A),
    "rs-aaer": _single(FGSM_RS, lambda e: aaer(e, _AAER_RS)),
    "n-aaer": _single(N_FGSM, lambda e: aaer(e, _AAER_N)),
    "fgsm-gradalign": _single(FGSM, lambda e: {"kind": "gradalign", "lam": gradalign_lambda(e)}),
    "pgd-at": _multi({"kind": "ce"}),
    "trades": _multi({"kind": "trades", "beta": 6.0}),
    # AWP official settings: AT γ 0.01 from epoch 1; TRADES γ 0.005 from epoch 10.
    "pgd-awp": _multi({"kind": "ce"}, awp={"kind": "awp", "gamma": 0.01, "warmup": 0}),
    "trades-awp": _multi({"kind": "trades", "beta": 6.0},
                         awp={"kind": "awp", "gamma": 0.005, "warmup": 10}),
    # ADR: SGD nesterov; the EMA teacher doubles as the WA model (same decay).
    "pgd-adr": _multi({"kind": "ce"}, labels=ADR_SGD, weight_average={"decay": 0.995},
                      schedule=ADR_SCHEDULE),
    "trades-adr": _multi({"kind": "trades", "beta": 6.0}, labels=ADR_SGD,
                         weight_average={"decay": 0.995}, schedule=ADR_SCHEDULE),
    # Cohen et al.: Gaussian noise, 90 epochs, lr 0.1 ×0.1 every 30, wd 1e-4, certify at σ.
    "gaussian-smoothing": lambda e: {
        "recipe": {"adversary": {"kind": "gaussian", "sigma": 0.25}, "loss": {"kind": "ce"},
                   "regularizers": []},
        "schedule": {"epochs": 90, "batch_size": 256, "momentum": 0.9, "weight_decay": 1e-4,
                     "lr": {"kind": "piecewise", "lr_max": 0.1, "milestones": [1 / 3, 2 / 3],
                            "gamma": 0.1}}},
    # ADR + AWP: ADR's AWP settings (τ_low 1.5, λ_high 0.85, ρ = γ = 0.005), official AWP rule.
    "pgd-adr-awp": _multi({"kind": "ce"}, awp={"kind": "awp", "gamma": 0.005, "warmup": 0},
                          labels=ADR_AWP, weight_average={"decay": 0.995}, schedule=LONG_SCHEDULE),
}


def merge(base: Any, override: Any, *, by_kind: bool = True) -> Any:
    """Deep merge: dicts key by key; lists of ``kind``-tagged dicts matched by kind; with
    ``by_kind``, a dict whose ``kind`` differs from the base's replaces it (a recipe part of
    another kind shares no fields); anything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        if by_kind and "kind" in override and base.get("kind") not in (None, override["kind"]):
            return copy.deepcopy(override)
        out = copy.deepcopy(base)
        for k, v in override.items():
            out[k] = merge(out[k], v, by_kind=by_kind) if k in out else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(override, list):
        by_kind = {b["kind"]: b for b in base if isinstance(b, dict) and "kind" in b}
        return [merge(by_kind[o["kind"]], o) if isinstance(o, dict) and o.get("kind") in by_kind
                else copy.deepcopy(o) for o in override]
    return copy.deepcopy(override)


def apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Resolve ``recipe`` given as a preset name (or ``{"preset": name, ...overrides}``)."""
    recipe = data.get("recipe")
    if isinstance(recipe, str):
        recipe = {"preset": recipe}
    if not isinstance(recipe, dict) or not recipe.get("preset"):
        return data
    name = recipe["preset"]
    if not isinstance(name, str):
        return data  # RecipeSpec reports "recipe.preset: Input should be a valid string"
    if name not in PRESETS:
        raise ValueError(f"recipe.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    threat = data.get("threat") or {}
    if not isinstance(threat, dict):
        return data
    try:
        eps = parse_epsilon(threat.get("epsilon", 8 / 255))
    except ValueError:
        return data  # ThreatSpec validation reports the bad epsilon with its field name
    base = PRESETS[name](eps255(eps, str(threat.get("norm", "linf")).strip().lower()))
    out = dict(data)
    out["recipe"] = merge(base["recipe"], recipe)
    user_schedule = data.get("schedule")
    # Schedules merge field by field: {"lr": {"kind": "cosine"}} keeps the preset's lr_max.
    out["schedule"] = (merge(base["schedule"], user_schedule, by_kind=False)
                       if isinstance(user_schedule, dict)
                       else user_schedule if user_schedule is not None
                       else copy.deepcopy(base["schedule"]))
    return out


def _params(part: dict[str, Any], skip: tuple[str, ...] = ("kind",)) -> str:
    vals = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in part.items() if k not in skip and v is not None
            and not (isinstance(v, bool) and not v)]
    return f"{part['kind']}({', '.join(vals)})" if vals else part["kind"]


def describe_recipe(recipe: Any) -> str:
    """A recipe in one line: adversary, loss and regularizers with their parameters."""
    r = recipe.model_dump(mode="json") if hasattr(recipe, "model_dump") else recipe
    parts = [_params(r["adversary"]), _params(r["loss"])]
    parts += [_params(g, ("kind", "gradient", "official_double_step"))
              for g in r.get("regularizers", [])]
    return " + ".join(parts)


def describe_presets(epsilon: Any = "8/255", norm: str = "linf") -> list[dict[str, str]]:
    """One row per preset with every part resolved at ``epsilon``: adversary, loss,
    regularizers with their λ, AWP γ, labels (ADR), weight averaging, epochs, optimizer, lr."""
    e = eps255(parse_epsilon(epsilon), norm)
    rows = []
    for name, build in PRESETS.items():
        p = build(e)
        r, sch = p["recipe"], p["schedule"]
        lr = sch["lr"]
        wp = r.get("weight_perturbation")
        labels = r.get("labels") or {"kind": "hard"}
        wa = r.get("weight_average")
        rows.append({
            "preset": name,
            "adversary": _params(r["adversary"]),
            "loss": _params(r["loss"]),
            "regularizers": ", ".join(_params(g, ("kind", "gradient", "official_double_step"))
                                      for g in r.get("regularizers", [])) or "-",
            "awp": _params(wp, ("kind",)) if wp else "-",
            "labels": (f"adr(τ {labels['tau_high']:g}→{labels['tau_low']:g}, "
                       f"λ {labels['lam_low']:g}→{labels['lam_high']:g})"
                       if labels["kind"] == "adr" else labels["kind"]),
            "wa": f"ema({wa['decay']:g})" if wa else "-",
            "epochs": str(sch["epochs"]),
            "optimizer": sch.get("optimizer", "sgd")
            + (" nesterov" if sch.get("nesterov") else ""),
            "lr": f"{lr['kind']} {lr['lr_max']:g}",
        })
    return rows


def presets(epsilon: Any = "8/255", norm: str = "linf") -> dict[str, dict[str, Any]]:
    """Every preset's composition (recipe and schedule) as it resolves at ``epsilon``."""
    e = eps255(parse_epsilon(epsilon), norm)
    return {name: copy.deepcopy(build(e)) for name, build in PRESETS.items()}
