"""AWP, ADR and the weight average against independent computations (docs/methods.md,
"Robust-overfitting remedies for multi-step AT")."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from bulwark.contract.spec import ADRSpec, AWPSpec, JobSpec
from bulwark.defenses.adr import ADRLabels, cosine, rectified_labels
from bulwark.defenses.awp import AWP
from bulwark.defenses.ema import EMA
from bulwark.defenses.losses import CELoss, TradesLoss
from bulwark.defenses.recipe import Recipe
from bulwark.workers.engine.runner import Cancelled, run_job


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64)
    x_adv = (x + 0.03 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    y = torch.randint(0, 3, (6,), generator=g)
    return x, x_adv, y


# ---------------------------------------------------------------------------------- AWP
@pytest.mark.parametrize("loss", [CELoss(), TradesLoss(6.0)], ids=["ce", "trades"])
def test_awp_step_equals_sgd_at_the_perturbed_weights(loss):
    """w_new = w − lr·∇L(w + γv), v_l = ‖w_l‖Δ_l/‖Δ_l‖ from a proxy ascent step (by hand)."""
    gamma, lr, proxy_lr = 0.01, 0.1, 0.01
    model = bn_net()
    x, x_adv, y = batch()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}

    # the independent computation
    proxy = copy.deepcopy(model).train()
    ascent = -loss(proxy, x, x_adv, y).loss
    grads = torch.autograd.grad(ascent, list(proxy.parameters()))
    stepped = {n: p.detach() - proxy_lr * g
               for (n, p), g in zip(proxy.named_parameters(), grads, strict=True)}
    v = {}
    for n, w in w0.items():
        if n.endswith("weight") and w.dim() > 1:
            d = stepped[n] - w
            v[n] = w.norm() / d.norm() * d
    assert set(v) == {"0.weight", "4.weight"}, "only conv/linear weights are perturbed"
    shifted = copy.deepcopy(model).train()
    with torch.no_grad():
        for n, p in shifted.named_parameters():
            p.add_(gamma * v.get(n, torch.zeros_like(p)))
    g_shift = torch.autograd.grad(loss(shifted, x, x_adv, y).loss, list(shifted.parameters()))
    expected = {n: w0[n] - lr * g
                for (n, _), g in zip(shifted.named_parameters(), g_shift, strict=True)}

    # Bulwark's AWP around one plain SGD step
    awp = AWP(AWPSpec(gamma=gamma), loss)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    running = model[1].running_mean.clone()
    norm = awp.perturb(model, x, x_adv, y)
    assert torch.equal(model[1].running_mean, running), "the proxy step leaves BN stats alone"
    assert torch.equal(model[0].bias, w0["0.bias"]) and torch.equal(model[1].weight,
                                                                    w0["1.weight"])
    assert norm.item() == pytest.approx(
        gamma * math.sqrt(sum(w0[n].norm().item() ** 2 for n in v)), rel=1e-9)
    out = loss(model, x, x_adv, y)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    awp.after_step(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-10, atol=1e-12)


def test_sam_variant_steps_from_w_with_the_gradient_at_w_plus_e():
    """ADR's SAM-style AWP: e_p = ρ‖p‖/‖∇p‖·∇p on every parameter, the loss at w + e with
    BatchNorm statistics frozen, then the step from w: w_new = w − lr·∇L(w + e) (by hand)."""
    rho, lr = 0.005, 0.1
    model = bn_net()
    x, x_adv, y = batch()
    loss = CELoss()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model).train()
    grads = torch.autograd.grad(loss(ref, x, x_adv, y).loss, list(ref.parameters()))
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads, strict=True):
            p.add_(rho * p.norm() / g.norm() * g)  # every parameter, BatchNorm and biases too
    running_after_first = copy.deepcopy(ref[1].running_mean)
    g_e = torch.autograd.grad(loss(ref, x, x_adv, y).loss, list(ref.parameters()))
    expected = {n: w0[n] - lr * g for (n, _), g in zip(ref.named_parameters(), g_e, strict=True)}

    spec = JobSpec.model_validate({"recipe": {
        "preset": "pgd-at", "weight_perturbation": {"kind": "awp_sam", "rho": rho}}}).recipe
    recipe = Recipe(spec, eps=8 / 255, norm="linf")
    sam = recipe.weight_perturbation
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    sam.perturb(model, x, x_adv, y)
    torch.testing.assert_close(model[1].running_mean, running_after_first)
    out = loss(model, x, x_adv, y)  # second pass: statistics frozen
    torch.testing.assert_close(model[1].running_mean, running_after_first)
    opt.zero_grad()
    out.loss.backward()
    sam.before_step(model)
    opt.step()
    sam.after_step(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-10, atol=1e-12)
    assert model[1].momentum == 0.1, "BatchNorm momentum is restored"


def test_awp_warmup_and_recipe_restore():
    spec = JobSpec.model_validate({"recipe": {"preset": "trades-awp"}}).recipe
    recipe = Recipe(spec, eps=8 / 255, norm="linf")
    model = bn_net().float()
    recipe.bind(model, total_steps=4)
    x, _, y = batch()
    x = x.float()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    recipe.begin_epoch(9)  # warm-up 10: not yet
    out = recipe.step(model, x, y)
    assert "awp_norm" not in out.metrics
    recipe.begin_epoch(10)
    out = recipe.step(model, x, y)
    assert out.metrics["awp_norm"] > 0
    assert not torch.equal(model.state_dict()["0.weight"], w0["0.weight"])
    recipe.before_optimizer_step(model)
    recipe.after_step(model)  # no optimizer step taken: restore returns w exactly
    for k, v in model.state_dict().items():
        if k.endswith("weight"):
            torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------- ADR
def test_rectified_labels_match_the_formula():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.5], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 0, 2])
    tau, lam = 2.0, 0.8
    target, lam_i = rectified_labels(logits, y, tau, lam)
    p = torch.softmax(logits / tau, dim=1)
    for i in range(3):
        delta = p[i].max() - p[i, y[i]]
        li = min(max(lam - delta.item(), 0.0), 1.0)
        assert lam_i[i].item() == pytest.approx(li, abs=1e-7)
        hand = li * p[i] + (1 - li) * F.one_hot(y[i], 3).float()
        torch.testing.assert_close(target[i], hand)
    assert lam_i[0].item() == pytest.approx(lam), "teacher right: λ_i = λ_t"
    assert lam_i[1].item() < lam, "teacher wrong: its weight shrinks by its margin"
    torch.testing.assert_close(target.sum(1), torch.ones(3))


def test_true_class_is_always_the_argmax():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(2000, 10, generator=g)
    y = torch.randint(0, 10, (2000,), generator=g)
    for tau, lam in [(2.5, 0.7), (1.5, 0.95), (1.0, 1.0)]:
        target, _ = rectified_labels(logits, y, tau, lam)
        true = target.gather(1, y[:, None])
        assert (true >= target - 1e-7).all()
        torch.testing.assert_close(target.sum(1), torch.ones(2000))


def test_adr_schedules_endpoints_and_direction():
    adr = ADRLabels(ADRSpec(tau_high=2.5, tau_low=1.5, lam_low=0.7, lam_high=0.85))
    adr.total = 1000
    assert adr.schedule(0) == pytest.approx((2.5, 0.7))
    assert adr.schedule(1000) == pytest.approx((1.5, 0.85))
    assert adr.schedule(500) == pytest.approx((2.0, 0.775))
    taus = [adr.schedule(t)[0] for t in range(0, 1001, 50)]
    lams = [adr.schedule(t)[1] for t in range(0, 1001, 50)]
    assert taus == sorted(taus, reverse=True) and lams == sorted(lams)
    assert cosine(1.0, 0.0, 250, 1000) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_adr_teacher_sees_clean_input_and_labels_feed_the_attack():
    spec = JobSpec.model_validate({"recipe": "pgd-adr"}).recipe
    recipe = Recipe(spec, eps=8 / 255, norm="linf")
    model = bn_net().float()
    recipe.bind(model, total_steps=10)
    assert recipe.teacher_is_weight_average, "same decay: one EMA serves as teacher and WA"
    seen = []
    recipe.adr.teacher.module.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    x, _, y = batch()
    x = x.float()
    recipe.step(model, x, y)
    assert len(seen) == 1 and torch.equal(seen[0], x)


# ---------------------------------------------------------------------------------- EMA
def test_ema_update_equals_the_formula():
    model = bn_net()
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].running_mean.add_(2.0)
    model[1].num_batches_tracked.add_(5)
    ema.update(model)
    for k, v in ema.state_dict().items():
        new = model.state_dict()[k]
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * new)
        else:
            assert torch.equal(v, new)
    assert not ema.module.training


# ---------------------------------------------------------------------------------- resume
def tiny(preset: str) -> JobSpec:
    return JobSpec.model_validate({
        "dataset": {"name": "synthetic", "val_size": 64,
                    "synthetic": {"image_size": 8, "n_train": 320, "n_test": 64,
                                  "num_classes": 4}},
        "recipe": {"preset": preset, "adversary": {"kind": "pgd", "steps": 2}},
        "schedule": {"epochs": 3, "batch_size": 64, "lr": {"lr_max": 0.05}},
        "evaluation": {"monitor": {"size": 64, "pgd_steps": 2},
                       "final": {"n": 32, "pgd": {"steps": 2, "restarts": 1},
                                 "autoattack": None, "models": ["last", "best", "wa"]}},
    })


def test_resume_restores_teacher_wa_and_awp_exactly(tmp_path):
    spec = tiny("pgd-adr-awp")
    full = run_job(spec, tmp_path / "full", device="cpu", progress=False)
    done = {"epoch": 0}
    with pytest.raises(Cancelled):
        run_job(spec, tmp_path / "part", device="cpu", progress=False,
                on_event=lambda k, d: done.update(epoch=d["epoch"]) if k == "epoch" else None,
                should_stop=lambda: done["epoch"] >= 2)
    resumed = run_job(spec, tmp_path / "part", device="cpu", progress=False, resume=True)
    for name in ("model.safetensors", "wa.safetensors", "best.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "part" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["final_models"] == full["final_models"]
    assert set(full["final_models"]) == {"last", "best", "wa"}
    m = full["history"][-1]["metrics"]
    assert {"awp_norm", "adr_tau", "adr_lambda", "adr_lambda_i"} <= set(m)
    sel = full["selection"]
    best = max(h["monitor"]["pgd_acc"] for h in full["history"])
    assert sel["monitor_pgd_acc"] == best
    assert sel["robust_generalization_gap"] == pytest.approx(
        best - full["history"][-1]["monitor"]["pgd_acc"])
