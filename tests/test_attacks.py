"""attacks/: single-step attacks, PGD and the input gradient, against hand-computed oracles.

Linear models make the CE input gradient available in closed form,
∇_x CE(Wx + b, y) = Wᵀ(softmax(Wx + b) − e_y), so every attack step can be recomputed by hand
with numpy. For a 2-class linear model the ℓ∞ / ℓ2 worst case is also closed form.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bulwark.attacks import FGSM, FGSM_RS, N_FGSM, PGD, input_gradient
from bulwark.attacks.objectives import cross_entropy
from tests.helpers import linear_model

torch.set_num_threads(1)

SHAPE = (1, 2, 3)  # C, H, W of the toy images (d = 6)
D = 6
K = 3


# ---------------------------------------------------------------------------------- helpers
def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def hand_grad(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """∇_x CE per example for logits Wx + b, flattened [B, d]."""
    xf = x.reshape(x.shape[0], -1)
    p = softmax(xf @ w.T + b)
    p[np.arange(len(y)), y] -= 1.0
    return p @ w


def hand_ce(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = x.reshape(x.shape[0], -1) @ w.T + b
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return lse - z[np.arange(len(y)), y]


def toy_problem(seed: int = 0, batch: int = 5):
    """A linear 3-class problem whose input gradients are far from 0 in every coordinate,
    and inputs that include pixels exactly at 0 and 1 (to exercise the clipping)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(K, D))
    b = rng.normal(size=K) * 0.3
    x = rng.uniform(0.0, 1.0, size=(batch, *SHAPE))
    x[0, 0, 0, :2] = 0.0
    x[1, 0, 1, 1:] = 1.0
    x[2, 0, 0, 0] = 1.0
    y = rng.integers(0, K, size=batch)
    assert np.abs(hand_grad(w, b, x, y)).min() > 1e-3  # signs are unambiguous
    return w, b, x, y


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)).double()


def boxed_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[8, 1, 4, 4] in [0, 1] with whole rows at exactly 0 and 1 and an interior middle."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64) * 0.4 + 0.3
    x[:, :, 0, :] = 0.0
    x[:, :, 3, :] = 1.0
    y = torch.randint(0, 4, (8,), generator=g)
    return x, y


# ---------------------------------------------------------------------------------- FGSM
def test_fgsm_linf_matches_hand_computed_sign_step():
    w, b, x, y = toy_problem()
    eps = 0.1
    x_adv = FGSM(linear_model(w, b), eps)(t(x), t(y)).numpy()
    g = hand_grad(w, b, x, y).reshape(x.shape)
    expected = np.clip(x + eps * np.sign(g), 0.0, 1.0)
    np.testing.assert_allclose(x_adv, expected, rtol=0, atol=1e-12)


def test_fgsm_l2_matches_hand_computed_normalized_step():
    w, b, x, y = toy_problem(seed=1)
    eps = 0.25
    x_adv = FGSM(linear_model(w, b), eps, norm="l2")(t(x), t(y)).numpy()
    g = hand_grad(w, b, x, y)
    step = eps * g / np.linalg.norm(g, axis=1, keepdims=True)
    expected = np.clip(x + step.reshape(x.shape), 0.0, 1.0)
    np.testing.assert_allclose(x_adv, expected, rtol=0, atol=1e-6)


def test_fgsm_result_fields_are_the_clean_point_and_gradient():
    w, b, x, y = toy_problem(seed=2)
    res = FGSM(linear_model(w, b), 0.05).perturb(t(x), t(y))
    assert not res.noisy
    np.testing.assert_array_equal(res.x_init.numpy(), x)
    np.testing.assert_allclose(res.grad_init.numpy().reshape(len(y), -1), hand_grad(w, b, x, y),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.loss_init.numpy(), hand_ce(w, b, x, y), rtol=1e-6)
    np.testing.assert_allclose(res.logits_init.numpy(), x.reshape(len(y), -1) @ w.T + b,
                               atol=1e-12)


# ---------------------------------------------------------------------------- FGSM-RS / N-FGSM
def test_fgsm_rs_step_is_projected_sign_step_from_the_noisy_start():
    w, b, x, y = toy_problem(seed=3)
    eps = 0.1
    torch.manual_seed(0)
    res = FGSM_RS(linear_model(w, b), eps).perturb(t(x), t(y))
    assert res.noisy
    x_init = res.x_init.numpy()
    eta = x_init - x
    assert np.all(np.abs(eta) <= eps + 1e-12)
    assert np.all((x_init >= 0) & (x_init <= 1))
    g = hand_grad(w, b, x_init, y).reshape(x.shape)
    delta = np.clip(eta + 1.25 * eps * np.sign(g), -eps, eps)
    expected = np.clip(x + delta, 0.0, 1.0)
    np.testing.assert_allclose(res.x_adv.numpy(), expected, rtol=0, atol=1e-12)
    # the projection is active: some coordinates sit exactly on the ε boundary
    assert np.isclose(np.abs(res.x_adv.numpy() - x), eps, atol=1e-12).any()


def test_fgsm_rs_unclipped_start_as_wong_et_al_mnist_code():
    """clip_start=False (locuslab/fast_adversarial MNIST/train_mnist.py): the gradient is taken
    at x + η even outside [0, 1]; δ = clip(η + 1.25ε·sign g, −ε, ε); only x + δ is clipped. The
    same draw with clip_start=True starts from clip(x + η) instead."""
    w, b, x, y = toy_problem(seed=5)
    eps = 0.3
    model = linear_model(w, b)
    torch.manual_seed(7)
    res = FGSM_RS(model, eps, clip_start=False).perturb(t(x), t(y))
    torch.manual_seed(7)
    clipped = FGSM_RS(model, eps).perturb(t(x), t(y))
    x_init = res.x_init.numpy()
    eta = x_init - x
    assert np.all(np.abs(eta) <= eps + 1e-12)
    outside = (x_init < 0) | (x_init > 1)
    assert outside.any(), "the pixels at 0 and 1 put some starts outside the box"
    np.testing.assert_allclose(clipped.x_init.numpy(), np.clip(x_init, 0, 1), atol=1e-12)
    g = hand_grad(w, b, x_init, y).reshape(x.shape)
    np.testing.assert_allclose(res.grad_init.numpy(), g, rtol=1e-6, atol=1e-9)
    expected = np.clip(x + np.clip(eta + 1.25 * eps * np.sign(g), -eps, eps), 0.0, 1.0)
    np.testing.assert_allclose(res.x_adv.numpy(), expected, rtol=0, atol=1e-12)
    # on a pixel at 0 whose η < −0.075 and whose gradient is positive the two differ: the
    # unclipped start gives η + 0.375 < 0.3, the clipped one 0 + 0.375 → ε
    gc = hand_grad(w, b, clipped.x_init.numpy(), y).reshape(x.shape)
    differ = (x == 0) & (eta < -0.075) & (g > 0) & (gc > 0)
    assert differ.any()
    np.testing.assert_allclose(res.x_adv.numpy()[differ], (eta + 0.375)[differ], atol=1e-12)
    np.testing.assert_allclose(clipped.x_adv.numpy()[differ], eps, atol=1e-12)


def test_n_fgsm_unclipped_start():
    """N-FGSM with clip_start=False: the gradient at x + η even outside [0, 1], the step ε
    unprojected, only x + η + ε·sign g clipped."""
    w, b, x, y = toy_problem(seed=6)
    eps = 0.3
    torch.manual_seed(3)
    res = N_FGSM(linear_model(w, b), eps, clip_start=False).perturb(t(x), t(y))
    eta = res.x_init.numpy() - x
    assert ((res.x_init.numpy() < 0) | (res.x_init.numpy() > 1)).any()
    assert np.all(np.abs(eta) <= 2 * eps + 1e-12)
    g = hand_grad(w, b, res.x_init.numpy(), y).reshape(x.shape)
    np.testing.assert_allclose(res.x_adv.numpy(), np.clip(x + eta + eps * np.sign(g), 0, 1),
                               rtol=0, atol=1e-12)


def test_unclipped_adversarial_input_as_elle_official_code():
    """clip_adv=False (ELLE's official Trainer): x'' = x + δ as the step leaves it, outside
    [0, 1] on pixels at the box's edge; the same draw with the clip is that point clipped."""
    w, b, x, y = toy_problem(seed=8)
    eps = 0.3
    model = linear_model(w, b)
    res = FGSM(model, eps, clip_adv=False).perturb(t(x), t(y))
    g = hand_grad(w, b, x, y).reshape(x.shape)
    np.testing.assert_allclose(res.x_adv.numpy(), x + eps * np.sign(g), rtol=0, atol=1e-12)
    assert ((res.x_adv.numpy() < 0) | (res.x_adv.numpy() > 1)).any()
    for attack in (lambda **kw: FGSM_RS(model, eps, clip_start=False, **kw),
                   lambda **kw: N_FGSM(model, eps, **kw)):
        torch.manual_seed(9)
        free = attack(clip_adv=False).perturb(t(x), t(y))
        torch.manual_seed(9)
        clipped = attack().perturb(t(x), t(y))
        assert ((free.x_adv.numpy() < 0) | (free.x_adv.numpy() > 1)).any()
        np.testing.assert_allclose(clipped.x_adv.numpy(), np.clip(free.x_adv.numpy(), 0, 1),
                                   rtol=0, atol=1e-12)


def test_spec_clip_adv_reaches_the_training_adversary():
    """`recipe.adversary.clip_adv: false` in a job spec gives the unclipped x'' above."""
    from bulwark.attacks import cross_entropy
    from bulwark.contract.spec import FGSMAdversary
    from bulwark.defenses.adversary import Adversary

    w, b, x, y = toy_problem(seed=8)
    model = linear_model(w, b)
    out = {clip: Adversary(FGSMAdversary(clip_adv=clip), 0.3, "linf")(
        model, t(x), t(y), cross_entropy).x_adv.numpy() for clip in (True, False)}
    g = hand_grad(w, b, x, y).reshape(x.shape)
    np.testing.assert_allclose(out[False], x + 0.3 * np.sign(g), rtol=0, atol=1e-12)
    np.testing.assert_allclose(out[True], np.clip(x + 0.3 * np.sign(g), 0, 1), rtol=0, atol=1e-12)


def test_n_fgsm_step_is_unprojected_sign_step_from_wide_noise():
    w, b, x, y = toy_problem(seed=4)
    eps = 0.1
    torch.manual_seed(1)
    res = N_FGSM(linear_model(w, b), eps, k=2.0).perturb(t(x), t(y))
    x_init = res.x_init.numpy()
    eta = x_init - x
    assert np.all(np.abs(eta) <= 2 * eps + 1e-12)
    g = hand_grad(w, b, x_init, y).reshape(x.shape)
    expected = np.clip(x + eta + eps * np.sign(g), 0.0, 1.0)
    np.testing.assert_allclose(res.x_adv.numpy(), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- constraints
ATTACKS = {
    "fgsm": lambda m, e, n: FGSM(m, e, norm=n),
    "fgsm_rs": lambda m, e, n: FGSM_RS(m, e, norm=n),
    "pgd": lambda m, e, n: PGD(m, e, alpha=e / 4, steps=7, restarts=3, norm=n),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("norm,eps,tol", [("linf", 0.1, 1e-6), ("l2", 0.5, 1e-5)])
def test_projected_attacks_stay_in_box_and_ball(name, norm, eps, tol):
    torch.manual_seed(3)
    x, y = boxed_batch()
    x_adv = ATTACKS[name](mlp(), eps, norm)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + tol).all()
    assert (size > eps / 2).all()  # the attack did move


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.3)])
def test_n_fgsm_stays_in_box_and_is_not_projected(norm, eps):
    torch.manual_seed(4)
    x, y = boxed_batch(seed=1)
    k = 2.0
    x_adv = N_FGSM(mlp(1), eps, k=k)(x, y) if norm == "linf" else \
        N_FGSM(mlp(1), eps, k=k, norm="l2")(x, y)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= (k + 1) * eps + 1e-6).all()
    if norm == "linf":
        # many coordinates leave the ε-ball: no projection
        assert (delta.abs() > eps + 1e-6).any()
        assert (size > eps + 1e-6).float().mean() > 0.5
    else:
        assert (size > eps + 1e-6).any()


# ---------------------------------------------------------------------------------- PGD
def binary_problem(seed: int = 0, batch: int = 6, d: int = 8):
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.2, 0.6, size=(2, d)) * rng.choice([-1.0, 1.0], size=(2, d))
    w[1] = -w[0]  # w_0 − w_1 = 2 w_0, every coordinate well away from 0
    b = np.array([0.1, -0.1])
    x = rng.uniform(0.35, 0.65, size=(batch, 1, 1, d))
    y = np.arange(batch) % 2
    return w, b, x, y


def test_pgd_linf_reaches_closed_form_optimum_on_linear_binary_model():
    w, b, x, y = binary_problem()
    eps = 0.1
    torch.manual_seed(0)
    x_adv = PGD(linear_model(w, b), eps, alpha=eps / 4, steps=12)(t(x), t(y)).numpy()
    w_diff = w[y] - w[1 - y]  # [B, d]
    expected_delta = -eps * np.sign(w_diff)
    np.testing.assert_allclose((x_adv - x).reshape(len(y), -1), expected_delta, atol=1e-12)
    margin = lambda z: (z.reshape(len(y), -1) * w_diff).sum(1) + b[y] - b[1 - y]  # noqa: E731
    np.testing.assert_allclose(margin(x_adv), margin(x) - eps * np.abs(w_diff).sum(1),
                               atol=1e-10)


def test_pgd_l2_reaches_closed_form_optimum_on_linear_binary_model():
    w, b, x, y = binary_problem(seed=1)
    eps = 0.3
    torch.manual_seed(1)
    x_adv = PGD(linear_model(w, b), eps, alpha=eps / 4, steps=120, norm="l2")(t(x), t(y))
    w_diff = w[y] - w[1 - y]
    expected = -eps * w_diff / np.linalg.norm(w_diff, axis=1, keepdims=True)
    delta = (x_adv.numpy() - x).reshape(len(y), -1)
    np.testing.assert_allclose(delta, expected, atol=1e-6)
    margin = lambda z: (z.reshape(len(y), -1) * w_diff).sum(1) + b[y] - b[1 - y]  # noqa: E731
    np.testing.assert_allclose(margin(x_adv.numpy()),
                               margin(x) - eps * np.linalg.norm(w_diff, axis=1), atol=1e-6)


class Wiggly(nn.Module):
    """1-D toy: logits [3 sin(20x) + 2x, 0]; CE for class 0 has several local maxima of
    different heights in [0, 1], so PGD's answer depends on where it starts."""

    def forward(self, x):
        s = 3 * torch.sin(20 * x[:, 0]) + 2 * x[:, 0]
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_pgd_restarts_keep_the_per_example_worst_case():
    model = Wiggly()
    x = torch.linspace(0.3, 0.7, 12, dtype=torch.float64).unsqueeze(1)
    y = torch.zeros(12, dtype=torch.long)
    eps, restarts = 0.3, 5
    kw = {"alpha": 0.01, "steps": 60}

    torch.manual_seed(7)
    singles = [PGD(model, eps, **kw)(x, y) for _ in range(restarts)]
    losses = torch.stack([cross_entropy(model(s), y) for s in singles])  # [R, B]

    torch.manual_seed(7)
    best = PGD(model, eps, restarts=restarts, **kw)(x, y)
    best_loss = cross_entropy(model(best), y)

    # the restarts really disagree, and not always in favour of the same one
    assert (losses.max(0).values - losses.min(0).values > 0.5).any()
    assert len(set(losses.argmax(0).tolist())) > 1
    # per example: the best of the independently run restarts, and its point
    torch.testing.assert_close(best_loss, losses.max(0).values, rtol=0, atol=1e-6)
    chosen = torch.stack([singles[r][i] for i, r in enumerate(losses.argmax(0).tolist())])
    torch.testing.assert_close(best, chosen, rtol=0, atol=1e-12)
    assert (best_loss >= losses[0] - 1e-12).all()
    assert ((best - x).abs() <= eps + 1e-12).all() and best.min() >= 0 and best.max() <= 1


# ---------------------------------------------------------------------------------- input gradient
def test_input_gradient_is_hand_gradient_and_computes_no_weight_gradients():
    w, b, x, y = toy_problem(seed=5)
    model = linear_model(w, b)
    grad, logits, loss = input_gradient(model, t(x), t(y), cross_entropy)
    assert all(p.grad is None for p in model.parameters())
    np.testing.assert_allclose(grad.numpy().reshape(len(y), -1), hand_grad(w, b, x, y),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss.detach().numpy(), hand_ce(w, b, x, y), rtol=1e-6)
    np.testing.assert_allclose(logits.detach().numpy(), x.reshape(len(y), -1) @ w.T + b,
                               atol=1e-12)
    assert not grad.requires_grad


def test_attacks_leave_weight_gradients_untouched():
    x, y = boxed_batch()
    model = mlp()
    FGSM_RS(model, 0.1)(x, y)
    N_FGSM(model, 0.1)(x, y)
    PGD(model, 0.1, alpha=0.025, steps=3, restarts=2)(x, y)
    assert all(p.grad is None for p in model.parameters())
