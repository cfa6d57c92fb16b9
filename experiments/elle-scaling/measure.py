"""How ELLE's local linearity error E_lin grows with ε, on one network and one batch.

ELLE's λ (and ELLE-A's λ_max) were tuned on CIFAR-10 at ε ≤ 16/255 (32/255 in its appendix).
λ·E_lin is the regularizer's size in the loss, so a λ carried to another ε carries another
strength unless E_lin stays put. This measures E_lin(ε) for ε from 1/255 to 0.3 (MNIST's
76.5/255) on `mnist_net` at four points of training — at initialisation, after one epoch of
plain training, after FGSM-RS training at ε = 0.3 (Wong et al.'s MNIST recipe for 2 epochs) and
after plain FGSM training at ε = 0.3 for 2 epochs (catastrophically overfit) — each on the same
512 validation images, E_lin averaged over 16 draws of the triplets, and fits the log-log slope
p of E_lin ∝ ε^p. For a twice-differentiable loss the residual is ≈ ½·α(1 − α)·(x_a −
x_b)ᵀ∇²ℓ(x_a − x_b), so p = 4 while the loss is locally quadratic.

The scaling rule it supports: to keep λ·E_lin at the size it had at the tuned ε_ref,
    λ(ε) = λ(ε_ref) · E_lin(ε_ref) / E_lin(ε) ≈ λ(ε_ref) · (ε_ref / ε)^p.

AAER's quantities (Lin et al. 2023) are measured the same way, on the same networks and
images, with FGSM-RS examples (Wong et al.'s MNIST step: α = 1.25ε from the unclipped start, 16
draws): the share of abnormal examples m/B (ℓ(x'') < ℓ(x'): the step lowered the loss), and
what λ3 and λ2 multiply per abnormal example, the logit variation ‖z(x'') − z(x')‖² (V_A, V_N;
λ3's term is the only one with a gradient in the official code) and the loss change (CE_var),
each averaged over every example (abnormal ones are too rare on a healthy network to average).
The same rule carries AAER's λ from the ε_ref its table was tuned at:
    λ3(ε) = λ3(ε_ref) · V(ε_ref) / V(ε),   λ2(ε) = λ2(ε_ref) · CE(ε_ref) / CE(ε).

Run (CPU, ~5 minutes): python experiments/elle-scaling/measure.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bulwark.attacks import FGSM_RS  # noqa: E402
from bulwark.attacks.objectives import cross_entropy  # noqa: E402
from bulwark.contract.spec import DatasetSpec, JobSpec  # noqa: E402
from bulwark.defenses.aaer import abnormal_mask  # noqa: E402
from bulwark.defenses.elle import linearity_residual  # noqa: E402
from bulwark.workers.engine.checkpoint import load_model  # noqa: E402
from bulwark.workers.engine.data import load_dataset, split_validation  # noqa: E402

EPSILONS_255 = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 76.5]
DRAWS = 16
BATCH = 512


def e_lin(model, x, y, eps: float, generator: torch.Generator) -> float:
    """E_lin = mean over examples of the squared residual, averaged over DRAWS triplet draws
    (x_a, x_b ~ U(x + [−ε, ε]^d), α ~ U[0, 1]; the points are not clipped, as in ELLE)."""
    total = 0.0
    loss_fn = lambda z: cross_entropy(model(z), torch.cat([y] * 3))  # noqa: E731
    for _ in range(DRAWS):
        x_a = x + (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
        x_b = x + (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
        alpha = torch.rand(x.shape[0], generator=generator)
        with torch.no_grad():
            total += linearity_residual(loss_fn, x_a, x_b, alpha).pow(2).mean().item()
    return total / DRAWS


def aaer_terms(model, x, y, eps: float, seed: int) -> dict[str, float]:
    """What AAER's λ multiply, averaged over DRAWS draws of Wong et al.'s MNIST FGSM-RS (α =
    1.25ε, unclipped start): the share of abnormal examples m/B (ℓ(x'') < ℓ(x')); the logit
    variation ‖z(x'') − z(x')‖² (λ3's V) and the loss change |ℓ(x'') − ℓ(x')| (λ2's CE_var),
    each averaged over *every* example, as the size of the term per abnormal example."""
    torch.manual_seed(seed)
    attack = FGSM_RS(model, eps, alpha=1.25, clip_start=False)
    total = {"ratio": 0.0, "v": 0.0, "dce": 0.0}
    for _ in range(DRAWS):
        start = attack.perturb(x, y)
        with torch.no_grad():
            logits = model(start.x_adv)
            loss = cross_entropy(logits, y)
        total["ratio"] += abnormal_mask(start.loss_init, loss).float().mean().item()
        total["v"] += (logits - start.logits_init).pow(2).sum(1).mean().item()
        total["dce"] += (loss - start.loss_init).abs().mean().item()
    return {k: v / DRAWS for k, v in total.items()}


def slope(eps: list[float], values: list[float]) -> float:
    """Least-squares slope of log E_lin on log ε."""
    lx, ly = [math.log(e) for e in eps], [math.log(v) for v in values]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return (sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
            / sum((a - mx) ** 2 for a in lx))


def train(spec: dict, out: Path) -> Path:
    from bulwark.workers.engine.runner import run_job

    run_job(JobSpec.model_validate(spec), out, device="cpu", progress=False)
    return out / "model.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = {"dataset": {"name": "mnist", "val_size": 1000},
            "model": {"arch": "mnist_net", "normalization": "none"},
            "threat": {"norm": "linf", "epsilon": 0.3},
            "schedule": {"seed": 0},
            "evaluation": {"monitor": {"size": 256, "pgd_steps": 5},
                           "final": {"n": 256, "pgd": {"steps": 5, "restarts": 1},
                                     "autoattack": None}}}
    data = load_dataset(DatasetSpec(name="mnist", val_size=1000))
    _, _, val_x, val_y = split_validation(data.train_x, data.train_y, 1000, seed=0)
    x = val_x[:BATCH].float().div(255)
    y = val_y[:BATCH].long()

    nets = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init = {**base, "recipe": "standard", "schedule": {"seed": 0, "epochs": 1},
                "dataset": {"name": "mnist", "val_size": 1000, "train_limit": 1100}}
        nets["init (100 clean images)"] = load_model(train(init, tmp / "init"))
        clean = {**base, "recipe": "standard", "schedule": {"seed": 0, "epochs": 1}}
        nets["1 epoch of plain training"] = load_model(train(clean, tmp / "clean"))
        rs = {**base, "recipe": "fgsm-rs", "schedule": {"seed": 0, "epochs": 2}}
        nets["FGSM-RS at ε = 0.3, 2 epochs"] = load_model(train(rs, tmp / "rs"))
        # abnormal examples appear where single-step training overfits: plain FGSM at ε = 0.3
        # collapses in its second epoch on this base (experiments/quickstart/published.yaml)
        co = {**base, "recipe": "fgsm", "schedule": {"seed": 0, "epochs": 2}}
        nets["FGSM at ε = 0.3, 2 epochs (overfit)"] = load_model(train(co, tmp / "co"))

    eps = [e / 255 for e in EPSILONS_255]
    rows = {}
    for name, model in nets.items():
        model.eval()
        g = torch.Generator().manual_seed(0)
        values = [e_lin(model, x, y, e, g) for e in eps]
        small = [(e, v) for e, v in zip(eps, values, strict=True) if e <= 8 / 255]
        rows[name] = {"e_lin": values, "slope_all": slope(eps, values),
                      "slope_to_8": slope([e for e, _ in small], [v for _, v in small]),
                      "ratio_0.3_to_8": values[-1] / values[EPSILONS_255.index(8)],
                      "ratio_0.3_to_16": values[-1] / values[EPSILONS_255.index(16)]}
    aaer = {}
    for name, model in nets.items():
        terms = [aaer_terms(model, x, y, e, seed=i) for i, e in enumerate(eps)]
        aaer[name] = {k: [t[k] for t in terms] for k in terms[0]}
        for k in ("v", "dce"):
            at = aaer[name][k]
            aaer[name][f"slope_{k}"] = slope(eps, at)
            aaer[name][f"{k}_ratio_0.3_to"] = {
                str(ref): at[-1] / at[EPSILONS_255.index(ref)] for ref in (8, 16, 32)}
    result = {"epsilons_255": EPSILONS_255, "draws": DRAWS, "batch": BATCH,
              "network": "mnist_net, raw pixels", "nets": rows, "aaer": aaer,
              "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    print(f"E_lin on {BATCH} MNIST validation images, {DRAWS} draws (mnist_net, raw pixels)")
    print("ε·255  " + "  ".join(f"{e:>9g}" for e in EPSILONS_255))
    for name, r in rows.items():
        print(f"{name}")
        print("       " + "  ".join(f"{v:9.2e}" for v in r["e_lin"]))
        print(f"       slope (log-log) all ε {r['slope_all']:.2f}, ε ≤ 8/255 "
              f"{r['slope_to_8']:.2f}; E_lin(0.3) / E_lin(8/255) = {r['ratio_0.3_to_8']:.3g}, "
              f"/ E_lin(16/255) = {r['ratio_0.3_to_16']:.3g}")

    print(f"\nAAER's quantities on the same images, {DRAWS} FGSM-RS draws (α 1.25ε, unclipped): "
          "m/B, V = ‖z(x'') − z(x')‖², |ℓ(x'') − ℓ(x')|")
    print("ε·255  " + "  ".join(f"{e:>9g}" for e in EPSILONS_255))
    for name, r in aaer.items():
        print(name)
        for k in ("ratio", "v", "dce"):
            print(f"  {k:6s} " + "  ".join(f"{v:9.2e}" for v in r[k]))
        for k in ("v", "dce"):
            print(f"  {k}: slope {r[f'slope_{k}']:.2f}; {k}(0.3) / {k}(ε_ref): " + ", ".join(
                f"{ref}/255 {v:.3g}" for ref, v in r[f"{k}_ratio_0.3_to"].items()))


if __name__ == "__main__":
    main()
