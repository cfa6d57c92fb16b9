"""What a finished job made, in one word: the verdict beside the job's state.

``succeeded`` says a job ran to its end; the verdict says what it made, from the final suite's
figures alone (the watchdog's events are not read: they are judged against these same labels
in experiments/watchdog). Rules, in order (docs/methods.md, "Verdicts"):

  chance                    clean accuracy at most the largest class's share of the evaluated
                            images plus a margin: the model predicts (about) one class
  gradient_masking          the final suite's attack checks fail: AutoAttack >= 5 points
                            (and two standard errors) under PGD, or PGD above FGSM by more
                            than noise where PGD's steps reach ε (attack_warnings)
  catastrophic_overfitting  PGD accuracy under half of FGSM's while the model resists the
                            single-step attack (FGSM >= 0.8 x clean): that attack no longer
                            works, a multi-step one does
  unverified                no multi-step attack (PGD or AutoAttack) in the final suite
  not_robust                the strongest attack leaves at most chance + 0.1, or PGD under
                            half of FGSM while FGSM still fools the model (under-training)
  robust                    none of the above

Torch-free: the API, the CLI, the SDK and the dashboard's data all read it.
"""

from __future__ import annotations

import math
from typing import Any

# The evaluation's own sanity checks (Carlini et al. 2019, "On Evaluating Adversarial
# Robustness", §5; Athalye et al. 2018): a stronger attack must find at least what a weaker one
# finds. AutoAttack this many points under PGD, or PGD this many above FGSM, says the weaker
# attack was misled (gradient masking) — the PGD figure then overstates robustness.
ATTACK_GAP = 0.05   # AutoAttack's accuracy below PGD's
ORDER_SLACK = 0.01  # PGD's accuracy above FGSM's

LABELS = ("robust", "not_robust", "catastrophic_overfitting", "chance", "gradient_masking",
          "unverified")
CHANCE_MARGIN = 0.02  # at least; two standard errors of the share on n images when larger
ROBUST_ABOVE_CHANCE = 0.1
CO_PGD_OF_FGSM = 0.5
CO_FGSM_OF_CLEAN = 0.8


def _first(accs: dict[str, float], prefix: str) -> tuple[str | None, float | None]:
    return next(((k, a) for k, a in accs.items() if k.startswith(prefix)), (None, None))


def _noise(acc: float, n: int | None) -> float:
    """Two standard errors of an accuracy on ``n`` images (0 when n is unknown)."""
    if not n:
        return 0.0
    return 2 * math.sqrt(max(acc * (1 - acc), 0.01) / n)


def attack_warnings(accs: dict[str, float], n: int | None = None,
                    pgd_reach: float | None = None) -> list[str]:
    """Where a final suite's attacks (name -> accuracy on ``n`` images) disagree as a masked
    gradient makes them: AutoAttack more than max(``ATTACK_GAP``, two standard errors) under
    PGD, or PGD more than max(``ORDER_SLACK``, two standard errors) above FGSM — the last only
    where PGD's steps can carry it as far as FGSM's one step of ε (``pgd_reach`` = steps × α,
    in ε, ≥ 1: PGD-2 at α = ε/4 reaches half of ε and may find less than FGSM honestly)."""
    out = []
    (pgd_name, pgd), (_, aa), fgsm = _first(accs, "pgd"), _first(accs, "autoattack"), \
        accs.get("fgsm")
    if pgd is not None and aa is not None and pgd - aa >= max(ATTACK_GAP, _noise(pgd, n)):
        out.append(f"AutoAttack finds {100 * (pgd - aa):.1f} points more than {pgd_name} "
                   f"({pgd:.3f} → {aa:.3f}): PGD is misled on this model (gradient masking?); "
                   "quote the AutoAttack figure")
    if pgd is not None and fgsm is not None and (pgd_reach is None or pgd_reach >= 1) \
            and pgd - fgsm >= max(ORDER_SLACK, _noise(pgd, n)):
        out.append(f"{pgd_name} ({pgd:.3f}) finds less than one FGSM step ({fgsm:.3f}): the "
                   "iterative attack is misled (gradient masking?)")
    return out


def pgd_reach(report: dict[str, Any]) -> float | None:
    """How far the final PGD's steps carry it, in ε: steps × α (None when the spec lacks it)."""
    pgd = (((report.get("spec") or {}).get("evaluation") or {}).get("final") or {}).get("pgd")
    if not isinstance(pgd, dict) or "steps" not in pgd:
        return None
    return pgd["steps"] * pgd.get("alpha", 0.25)


def final_split(report: dict[str, Any]) -> str:
    """Which images the final suite evaluated: ``test`` or ``validation``
    (evaluation.final.split; reports before it: test)."""
    final = ((report.get("spec") or {}).get("evaluation") or {}).get("final") or {}
    return final.get("split", "test")


def majority_share(report: dict[str, Any]) -> float:
    """The largest class's share of the evaluated test images (the runner records it), else
    one over the number of classes."""
    data = report.get("dataset") or {}
    share = data.get("majority_share")
    if share is not None:
        return float(share)
    classes = data.get("num_classes") or 10
    return 1.0 / classes


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """``{"label", "reason", ...figures}`` for a report (its ``final`` result)."""
    final = report["final"]
    attacks = final.get("attacks") or {}
    clean = final["clean_acc"]
    n = final.get("n") or 1
    share = majority_share(report)
    chance = share + max(CHANCE_MARGIN, 2 * math.sqrt(share * (1 - share) / n))
    fgsm = (attacks.get("fgsm") or {}).get("acc")
    pgd = next((a["acc"] for k, a in attacks.items() if k.startswith("pgd")), None)
    aa = next((a["acc"] for k, a in attacks.items() if k.startswith("autoattack")), None)
    multi = [a for a in (pgd, aa) if a is not None]
    robust_acc = min(multi) if multi else None
    figures = {"clean_acc": clean, "fgsm_acc": fgsm, "pgd_acc": pgd, "autoattack_acc": aa,
               "robust_acc": robust_acc, "chance": round(chance, 4), "n": n}

    def out(label: str, reason: str) -> dict[str, Any]:
        return {"label": label, "reason": reason, **figures}

    if clean <= chance:
        return out("chance", f"clean accuracy {clean:.3f} is at chance (the largest class is "
                             f"{share:.3f} of the {n} images): the model predicts about one "
                             "class")
    warnings = attack_warnings({k: a["acc"] for k, a in attacks.items()}, n,
                               pgd_reach(report))
    if warnings:
        return out("gradient_masking", warnings[0])
    if pgd is not None and fgsm is not None and pgd < CO_PGD_OF_FGSM * fgsm \
            and fgsm >= CO_FGSM_OF_CLEAN * clean:
        return out("catastrophic_overfitting",
                   f"PGD accuracy {pgd:.3f} is under half of FGSM's {fgsm:.3f} while FGSM "
                   f"barely fools the model (clean {clean:.3f}): the single-step attack no "
                   "longer works, a multi-step one does")
    if robust_acc is None:
        return out("unverified", "no multi-step attack (PGD or AutoAttack) was run: "
                                 "robustness to FGSM alone says little")
    if robust_acc <= chance + ROBUST_ABOVE_CHANCE:
        return out("not_robust", f"the strongest attack leaves {robust_acc:.3f}, within "
                                 f"{ROBUST_ABOVE_CHANCE} of chance ({chance:.3f})")
    if pgd is not None and fgsm is not None and pgd < CO_PGD_OF_FGSM * fgsm:
        return out("not_robust", f"PGD accuracy {pgd:.3f} is under half of FGSM's {fgsm:.3f} "
                                 f"and FGSM still fools the model often (clean {clean:.3f}): "
                                 "under-trained")
    return out("robust", f"{robust_acc:.3f} under the strongest attack, clean {clean:.3f}")
