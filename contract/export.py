"""Reports as others read them (torch-free): a RobustBench model card, and a leaderboard row.

A RobustBench model card (the fields of ``model_info/<dataset>/<threat>/<name>.json`` in the
RobustBench repository: link, name, authors, additional_data, number_forward_passes, dataset,
venue, architecture, eps, clean_acc, reported, autoattack_acc — accuracies as percentage
strings, ε as people write it) plus what a reader needs to trust the numbers here: the threat
model, the training method and its source, the evaluation (attack, points), and the weights'
file and digest.
"""

from __future__ import annotations

from typing import Any

from bulwark.contract.report import AttackResult, FinalResult, Report, as_report

ARCH_NAMES = {"small_cnn": "SmallCNN", "mnist_net": "MNIST-Net (Wong et al. 2020)",
              "preact_resnet18": "PreActResNet-18",
              "wide_resnet": "WideResNet"}
METRICS = ("autoattack", "pgd", "certified")


def eps_text(eps: float, norm: str) -> str:
    k = eps * 255
    if norm == "linf" and abs(k - round(k)) < 1e-6 and round(k) >= 1:
        return f"{round(k)}/255"
    return f"{eps:g}"


def _attack(final: FinalResult, prefix: str) -> tuple[str, AttackResult] | None:
    return next(((k, v) for k, v in final.attacks.items() if k.startswith(prefix)), None)


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.2f}"


def robustbench_card(report: Report | dict[str, Any], *, job_id: str | None = None,
                     weights_sha256: str | None = None) -> dict[str, Any]:
    """The model card of a finished job's report (the last-epoch model's figures)."""
    rep = as_report(report)
    spec, final = rep.spec, rep.final
    threat, model = spec["threat"], spec["model"]
    arch = ARCH_NAMES.get(model["arch"], model["arch"])
    if model["arch"] == "wide_resnet":
        arch = f"WideResNet-{model.get('depth')}-{model.get('widen_factor')}"
    aa, pgd = _attack(final, "autoattack"), _attack(final, "pgd")
    recipe = spec.get("recipe") or {}
    return {
        "link": None, "name": spec.get("name") or recipe.get("preset") or "bulwark job",
        "authors": None, "additional_data": False, "number_forward_passes": 1,
        "dataset": spec["dataset"]["name"], "venue": None, "architecture": arch,
        "eps": eps_text(threat["epsilon"], threat["norm"]),
        "clean_acc": _pct(final.clean_acc),
        "reported": _pct(pgd[1].acc) if pgd else None,
        "autoattack_acc": _pct(aa[1].acc) if aa else None,
        # beyond RobustBench's fields
        "threat_model": {"linf": "Linf", "l2": "L2"}[threat["norm"]],
        "training": {"preset": recipe.get("preset"), "recipe": recipe,
                     "source": "Bulwark job " + (job_id or "(local run)")},
        "evaluation": {"n": final.n, "model": final.model,
                       "autoattack": aa[0] if aa else None, "pgd": pgd[0] if pgd else None,
                       "note": "reported = Bulwark's PGD accuracy (multi-restart); "
                               "autoattack_acc = torchattacks' AutoAttack"},
        "weights": {"file": "model.safetensors", "sha256": weights_sha256,
                    "load": "bulwark.load_model('model.safetensors')"},
    }


def leaderboard_row(report: Report | dict[str, Any], metric: str = "autoattack",
                    radius: float = 0.5) -> dict[str, Any] | None:
    """A finished job's entry for ``metric`` (None when the report has no such figure):
    AutoAttack or PGD accuracy, or certified accuracy at ``radius`` (the largest tabulated
    radius not above it), with the threat it is ranked within, the attack suite and its n,
    whether that suite is AutoAttack ``standard`` on the whole test set, and the verdict."""
    rep = as_report(report)
    spec, final = rep.spec, rep.final
    value, what, extra = None, None, {}
    if metric in ("autoattack", "pgd"):
        found = _attack(final, metric)
        if found:
            what, value = found[0], found[1].acc
    elif metric == "certified":
        cert = rep.certification
        if cert:
            radii = [r for r in cert.radii if r <= radius + 1e-12]
            if radii:
                r = max(radii)
                what = f"certified@{r:g}"
                value = cert.certified_accuracy[cert.radii.index(r)]
                extra = {"radius": r, "sigma": cert.sigma}
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if value is None:
        return None
    threat = spec["threat"]
    attacks = list(final.attacks)
    return {"name": spec.get("name"), "dataset": spec["dataset"]["name"],
            "norm": threat["norm"], "epsilon": threat["epsilon"],
            "method": (spec.get("recipe") or {}).get("preset"), "arch": spec["model"]["arch"],
            "metric": what, "robust_acc": value, "clean_acc": final.clean_acc,
            "n": final.n, "seconds": rep.timing.get("total"),
            "suite": ", ".join(attacks) or "none",
            "standard": "autoattack-standard" in attacks and final.n >= rep.dataset.test
                        and rep.split == "test",
            "verdict": rep.verdict.label if rep.verdict else None,
            "split": rep.split, **extra}


def threat_of(row: dict[str, Any]) -> tuple[str, str, float]:
    """What a ranking is within: one dataset, one norm, one ε (ℓ2 and ℓ∞ never share one)."""
    return (row["dataset"], row["norm"], row["epsilon"])


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by threat (dataset, norm, ε), each group best first: robust accuracy,
    then clean accuracy, then fewer seconds. Only a ``robust`` verdict is ranked (a certified
    figure, a guarantee, is ranked whatever the empirical verdict); the rest follow their
    group with no rank, so a model at chance or overfit never sits among robust ones; nor does
    a figure on the validation slice (evaluation.final.split), whatever its verdict."""
    def key(r: dict[str, Any]) -> tuple:
        return (-r["robust_acc"], -r["clean_acc"], r.get("seconds") or 0.0)

    out = []
    for threat in sorted({threat_of(r) for r in rows}):
        group = [r for r in rows if threat_of(r) == threat]
        ranked = sorted((r for r in group if _ranked(r)), key=key)
        apart = sorted((r for r in group if not _ranked(r)), key=key)
        out += [{"rank": i + 1, **r} for i, r in enumerate(ranked)]
        out += [{"rank": None, **r} for r in apart]
    return out


def _ranked(row: dict[str, Any]) -> bool:
    if row.get("split", "test") != "test":  # a figure used to choose a setting, not a result
        return False
    return row.get("verdict") == "robust" or str(row.get("metric", "")).startswith("certified")


