"""defenses/: ELLE / ELLE-A, AAER, GradAlign, the losses and the Recipe composition.

Oracles: the closed-form chord residual of a quadratic, a plain-Python ELLE-A controller written
from docs/methods.md ("ELLE / ELLE-A"), AAER's formula and its hand gradient on chosen logits,
the CE input gradient of a linear model Wᵀ(softmax(Wx + b) − e_y), finite differences, and
numpy KL / CE.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bulwark.attacks import FGSM
from bulwark.attacks.objectives import cross_entropy, kl_to_clean
from bulwark.attacks.single_step import SingleStepResult
from bulwark.contract import spec as S
from bulwark.contract.presets import PRESETS
from bulwark.defenses import Recipe
from bulwark.defenses.aaer import AAER, abnormal_mask
from bulwark.defenses.context import StepContext
from bulwark.defenses.elle import ELLEAController, linearity_residual, local_linearity_error
from bulwark.defenses.gradalign import GradAlign
from bulwark.defenses.losses import CELoss, TradesLoss
from tests.helpers import linear_model

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------- helpers
def np_log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def np_ce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np_log_softmax(z)[np.arange(len(y)), y]


def hand_grad(w, b, x, y):
    """∇_x CE per example for logits Wx + b, flattened [B, d]."""
    p = np.exp(np_log_softmax(x.reshape(len(y), -1) @ w.T + b))
    p[np.arange(len(y)), y] -= 1.0
    return p @ w


def ctx_for(model, x, y, eps=8 / 255, norm="linf", start=None, logits_adv=None, loss_adv=None):
    return StepContext(model=model, x=x, target=y, eps=eps, norm=norm, x_adv=x,
                       logits_adv=logits_adv, loss_adv=loss_adv, start=start)


def mlp(seed=0, d=16, k=4, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 10), nn.Tanh(), nn.Linear(10, k)).to(dtype)


# ---------------------------------------------------------------------------------- ELLE residual
def test_linearity_residual_vanishes_for_a_linear_loss():
    rng = np.random.default_rng(0)
    c = torch.from_numpy(rng.normal(size=(2, 3)))
    x_a = torch.from_numpy(rng.normal(size=(5, 2, 3)))
    x_b = torch.from_numpy(rng.normal(size=(5, 2, 3)))
    alpha = torch.from_numpy(rng.uniform(size=5))
    res = linearity_residual(lambda z: (c * z).flatten(1).sum(1) + 1.7, x_a, x_b, alpha)
    assert res.shape == (5,)
    assert res.abs().max() < 1e-12


def test_linearity_residual_of_a_quadratic_is_the_closed_form_chord_curvature():
    rng = np.random.default_rng(1)
    d = 6
    a = rng.normal(size=(d, d))
    h = torch.from_numpy(a + a.T)
    bvec = torch.from_numpy(rng.normal(size=d))

    def loss_fn(z):
        zf = z.flatten(1)
        return 0.5 * torch.einsum("bi,ij,bj->b", zf, h, zf) + zf @ bvec

    x_a = torch.from_numpy(rng.normal(size=(7, 2, 3)))
    x_b = torch.from_numpy(rng.normal(size=(7, 2, 3)))
    alpha = torch.from_numpy(rng.uniform(size=7))
    res = linearity_residual(loss_fn, x_a, x_b, alpha).numpy()
    diff = (x_a - x_b).flatten(1).numpy()
    al = alpha.numpy()
    expected = -0.5 * al * (1 - al) * np.einsum("bi,ij,bj->b", diff, h.numpy(), diff)
    np.testing.assert_allclose(res, expected, rtol=0, atol=1e-10)
    assert np.abs(expected).min() > 1e-3  # the case is not degenerate


class Recorder(nn.Module):
    """Wraps a model and keeps the last input it saw."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, None

    def forward(self, z):
        self.seen = z.detach().clone()
        return self.inner(z)


def test_local_linearity_error_is_the_mean_squared_residual_on_a_random_chord():
    torch.manual_seed(0)
    eps = 0.3
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    x[:, :, 0, :] = 0.0  # pixels at 0: the triplet is not clipped to [0, 1]
    y = torch.randint(0, 4, (6,))
    model = Recorder(mlp(2))
    e_lin = local_linearity_error(ctx_for(model, x, y, eps=eps))

    z = model.seen  # the single 3B forward: x_a, x_b, x_c
    assert z.shape == (18, 1, 4, 4)
    x_a, x_b, x_c = z.chunk(3)
    for p in (x_a, x_b):
        assert ((p - x).abs() <= eps + 1e-12).all()
        assert ((p - x).abs() > eps / 2).any()  # spread over the ball, not a point
    assert (x_a < 0).any()  # not clipped
    assert not torch.equal(x_a, x_b)
    u = (x_b - x_a).flatten(1)
    alpha = ((x_c - x_a).flatten(1) * u).sum(1) / (u * u).sum(1)
    assert ((alpha >= 0) & (alpha <= 1)).all()
    a4 = alpha.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_c, (1 - a4) * x_a + a4 * x_b, rtol=0, atol=1e-12)

    yn = y.numpy()
    with torch.no_grad():
        la, lb, lc = (np_ce(model.inner(p).numpy(), yn) for p in (x_a, x_b, x_c))
    al = alpha.numpy()
    expected = np.mean((lc - (1 - al) * la - al * lb) ** 2)
    assert expected > 1e-7
    assert math.isclose(e_lin.item(), expected, rel_tol=2e-3)
    assert e_lin.requires_grad  # none of the three losses is detached


def test_local_linearity_error_on_linear_logit_models():
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=16) * 0.5
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64)
    y1 = torch.ones(8, dtype=torch.long)

    def two_class(offset):
        # logits [w·x + offset, 0]
        w = np.stack([w0, np.zeros(16)])
        return linear_model(w, np.array([offset, 0.0]))

    torch.manual_seed(0)
    tiny = local_linearity_error(ctx_for(two_class(0.0), x, y1, eps=1e-6)).item()
    torch.manual_seed(0)
    large = local_linearity_error(ctx_for(two_class(0.0), x, y1, eps=0.5)).item()
    assert tiny <= 1e-8
    assert large > 1e-6
    # with class 1 the CE is softplus(w·x + 50) = w·x + 50 − O(e^-50): linear in x
    torch.manual_seed(0)
    lin = local_linearity_error(ctx_for(two_class(50.0), x, y1, eps=0.5)).item()
    assert lin <= 1e-8


# ---------------------------------------------------------------------------------- ELLE-A
def elle_a_oracle(values, lam_max, s, gamma):
    lam, hist, out = 0.0, [], []
    for e in values:
        if len(hist) > 2 and e > np.mean(hist) + s * np.std(hist):
            lam = lam_max
        else:
            lam = gamma * lam
        hist.append(e)
        out.append(lam)
    return out


def scripted_sequence():
    rng = np.random.default_rng(0)
    seq = [1.0, 1.0, 30.0, 1.0, 40.0, 200.0, 1.0, 1.0, 1.0, 100.0]
    seq += list(rng.lognormal(0.0, 0.3, size=60))
    seq += [500.0] + list(rng.lognormal(0.0, 0.3, size=30))
    return [float(np.float32(v)) for v in seq]  # what a float32 E_lin can hold


def test_elle_a_controller_follows_the_reference_rule():
    seq = scripted_sequence()
    lam_max, s, gamma = 4000.0, 2.0, 0.99
    expected = elle_a_oracle(seq, lam_max, s, gamma)
    ctl = ELLEAController(lam_max, s, gamma)
    got = []
    for e in seq:
        ctl.update(torch.tensor(e, dtype=torch.float32))
        got.append(ctl.lam.item())
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    # the script hits the interesting cases
    assert got[2] == 0.0  # 30 ≫ mean + 2·std of [1, 1], but |H| = 2: no spike
    assert got[3] == 0.0
    assert got[4] == lam_max  # 40 > 8.25 + 2·12.56 (H = [1, 1, 30, 1])
    assert got[5] == lam_max  # spike while already at λ_max: reset, not 2·λ_max
    assert got[6] == lam_max * gamma
    assert max(got) == lam_max and sum(v == lam_max for v in got) >= 3


def test_elle_a_controller_resets_and_decays():
    ctl = ELLEAController(4000.0, 2.0, 0.99)
    for e in [1.0, 1.0, 1.0, 1.0]:
        ctl.update(torch.tensor(e))
    assert ctl.lam.item() == 0.0
    ctl.update(torch.tensor(5.0))  # std(H) = 0, 5 > 1: spike
    assert ctl.lam.item() == 4000.0
    ctl.update(torch.tensor(1000.0))  # another spike: λ stays λ_max
    assert ctl.lam.item() == 4000.0
    for _ in range(100):
        ctl.update(torch.tensor(0.0))  # below the mean: quiet
    assert math.isclose(ctl.lam.item(), 4000.0 * 0.99**100, rel_tol=1e-12)
    assert math.isclose(ctl.lam.item() / 4000.0, 0.366, abs_tol=1e-3)


def test_elle_a_controller_uses_population_std_of_the_whole_history():
    # H = [1, 1, 1, 3]: mean 1.5, population std √0.75 ≈ 0.866 (sample std 1.0)
    # threshold 1.5 + 2·0.866 = 3.232 < 3.4 < 3.5 = the sample-std threshold
    ctl = ELLEAController(10.0, 2.0, 0.5)
    for e in [1.0, 1.0, 1.0, 3.0]:
        ctl.update(torch.tensor(e))
    ctl.update(torch.tensor(3.4))
    assert ctl.lam.item() == 10.0
    # H = [1, 1, 1, 3, 3.4]: mean 1.88, population std 1.0852, threshold 4.050 > 3.9 → decay
    ctl.update(torch.tensor(3.9))
    assert ctl.lam.item() == 5.0


def test_elle_a_controller_state_dict_round_trip_continues_identically():
    seq = scripted_sequence()
    lam_max, s, gamma = 3000.0, 1.5, 0.95
    expected = elle_a_oracle(seq, lam_max, s, gamma)
    a = ELLEAController(lam_max, s, gamma)
    half = len(seq) // 2
    for e in seq[:half]:
        a.update(torch.tensor(e))
    b = ELLEAController(lam_max, s, gamma)
    b.load_state_dict(a.state_dict())
    got_a, got_b = [], []
    for e in seq[half:]:
        a.update(torch.tensor(e))
        b.update(torch.tensor(e))
        got_a.append(a.lam.item())
        got_b.append(b.lam.item())
    assert got_a == got_b
    np.testing.assert_allclose(got_b, expected[half:], rtol=1e-12)
    assert any(v == lam_max for v in got_b)


def job_recipe(name, **threat):
    return S.JobSpec.model_validate({"recipe": name, "threat": threat or {}}).recipe


def test_elle_a_recipe_uses_lambda_zero_on_the_first_step():
    rng = np.random.default_rng(5)
    w, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    model = linear_model(w, b)
    x = rng.uniform(0.1, 0.9, size=(4, 1, 2, 3))
    y = np.array([0, 1, 2, 1])
    eps = 8 / 255
    recipe = Recipe(job_recipe("fgsm-elle-a"), eps=eps, norm="linf")
    torch.manual_seed(0)
    out = recipe.step(model, torch.from_numpy(x), torch.from_numpy(y))
    x_adv = np.clip(x + eps * np.sign(hand_grad(w, b, x, y)).reshape(x.shape), 0, 1)
    fgsm_loss = np_ce(x_adv.reshape(4, -1) @ w.T + b, y).mean()
    assert math.isclose(out.loss.item(), fgsm_loss, rel_tol=1e-6)
    assert out.metrics["elle_lambda"].item() == 0.0
    assert out.metrics["elle_e_lin"].item() > 0.0  # E_lin is still computed while λ = 0
    recipe.after_step(model)
    state = recipe.state_dict()["regularizers"]["elle_a"]
    assert state["n"].item() == 1 and state["lam"].item() == 0.0
    assert math.isclose(state["mean"].item(), out.metrics["elle_e_lin"].item(), rel_tol=1e-6)


# ---------------------------------------------------------------------------------- AAER
LB = [1.0, 2.0, 0.5, 3.0]
LA = [1.5, 1.0, 0.7, 2.0]  # ℓ_a < ℓ_b at indices 1 and 3


def aaer_case(z_adv, z_init, loss_b=LB, loss_a=LA, **spec):
    z_adv = torch.tensor(z_adv, dtype=torch.float32, requires_grad=True)
    loss_a = torch.tensor(loss_a, dtype=torch.float32, requires_grad=True)
    b = len(loss_b)
    start = SingleStepResult(
        x_adv=torch.zeros(b, 2), x_init=torch.zeros(b, 2),
        logits_init=torch.tensor(z_init, dtype=torch.float32),
        loss_init=torch.tensor(loss_b, dtype=torch.float32),
        grad_init=torch.zeros(b, 2), noisy=True)
    ctx = StepContext(model=nn.Identity(), x=torch.zeros(b, 2), target=torch.zeros(b).long(),
                      eps=0.1, norm="linf", x_adv=torch.zeros(b, 2), logits_adv=z_adv,
                      loss_adv=loss_a, start=start)
    reg, metrics = AAER(S.AAER(**spec))(ctx)
    return reg, metrics, z_adv, loss_a


Z_INIT = [[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [0.2, 0.3, -0.1], [-0.5, 0.5, 2.0]]
# squared logit variations: 0.01, 2.0 (AAE), 0.04, 9.0 (AAE) -> V_A = 5.5, V_N = 0.025
Z_ADV_BIG = [[0.1, 0.0, 0.0], [2.0, -2.0, 0.5], [0.2, 0.3, 0.1], [-0.5, 3.5, 2.0]]
# variations: 0.01, 0.0 (AAE), 4.0, 0.0 (AAE) -> V_A = 0 ≤ V_N = 2.005
Z_ADV_SMALL = [[0.1, 0.0, 0.0], [1.0, -1.0, 0.5], [2.2, 0.3, -0.1], [-0.5, 0.5, 2.0]]


def test_aaer_abnormal_mask_is_loss_decrease():
    mask = abnormal_mask(torch.tensor(LB), torch.tensor(LA))
    assert mask.tolist() == [False, True, False, True]
    # a step that leaves the loss unchanged is normal (ℓ_a ≥ ℓ_b)
    tie = abnormal_mask(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.999]))
    assert tie.tolist() == [False, True]


@pytest.mark.parametrize("lam1,lam2,lam3", [(1.0, 2.5, 1.5), (0.7, 1.5, 0.15)])
def test_aaer_value_and_official_gradient_by_hand(lam1, lam2, lam3):
    reg, metrics, z_adv, loss_a = aaer_case(Z_ADV_BIG, Z_INIT, lam1=lam1, lam2=lam2, lam3=lam3)
    za, zb = np.array(Z_ADV_BIG), np.array(Z_INIT)
    v = ((za - zb) ** 2).sum(1)
    aae = np.array([False, True, False, True])
    m, batch = aae.sum(), 4
    v_a, v_n = v[aae].mean(), v[~aae].mean()
    ce_var = (np.array(LB) - np.array(LA))[aae].mean()
    assert (v_a, v_n, ce_var) == pytest.approx((5.5, 0.025, 1.0))
    expected = lam1 * (m / batch) * (lam2 * ce_var + lam3 * max(v_a - v_n, 0.0))
    assert reg.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["aaer_ratio"].item() == 0.5
    reg.backward()
    grad = np.zeros_like(za)
    grad[aae] = lam1 * lam3 * (m / batch) * 2 * (za - zb)[aae] / m
    np.testing.assert_allclose(z_adv.grad.numpy(), grad, rtol=1e-6, atol=1e-7)
    assert (z_adv.grad[~torch.from_numpy(aae)] == 0).all()
    # official: ℓ_a carries no gradient
    assert loss_a.grad is None or (loss_a.grad == 0).all()


def test_aaer_hinge_inactive_gives_no_gradient_but_keeps_the_ce_term_value():
    reg, _, z_adv, loss_a = aaer_case(Z_ADV_SMALL, Z_INIT, lam1=1.0, lam2=2.5, lam3=1.5)
    assert reg.item() == pytest.approx(1.0 * 0.5 * 2.5 * 1.0, rel=1e-6)
    reg.backward()
    assert z_adv.grad is None or (z_adv.grad == 0).all()
    assert loss_a.grad is None or (loss_a.grad == 0).all()


def test_aaer_paper_gradient_flows_through_the_ce_variation():
    lam1, lam2, lam3 = 1.0, 2.5, 1.5
    reg, _, z_adv, loss_a = aaer_case(Z_ADV_SMALL, Z_INIT, lam1=lam1, lam2=lam2, lam3=lam3,
                                      gradient="paper")
    reg.backward()
    # d/dℓ_a of λ1·(m/B)·λ2·mean_AAE(ℓ_b − ℓ_a) = −λ1·λ2/B on AAE rows
    np.testing.assert_allclose(loss_a.grad.numpy(), [0, -lam1 * lam2 / 4, 0, -lam1 * lam2 / 4],
                               rtol=1e-6)


@pytest.mark.parametrize("loss_a", [[1.5, 2.5, 0.7, 3.5], [0.5, 1.0, 0.2, 2.0]],
                         ids=["no_aae", "all_aae"])
def test_aaer_is_zero_without_both_kinds_of_examples(loss_a):
    reg, metrics, z_adv, _ = aaer_case(Z_ADV_BIG, Z_INIT, loss_a=loss_a)
    assert reg.item() == 0.0
    assert metrics["aaer_ratio"].item() in (0.0, 1.0)
    reg.backward()
    assert z_adv.grad is None or (z_adv.grad == 0).all()


def test_aaer_requires_a_single_step_start():
    ctx = ctx_for(nn.Identity(), torch.zeros(2, 2), torch.zeros(2).long())
    with pytest.raises(ValueError, match="single-step"):
        AAER(S.AAER())(ctx)


# ---------------------------------------------------------------------------------- GradAlign
def grad_problem(seed=0):
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    x = rng.uniform(0.2, 0.8, size=(5, 1, 2, 3))
    y = rng.integers(0, 3, size=5)
    return w, b, x, y


def test_gradalign_is_zero_for_a_tiny_radius():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    model = mlp(3)
    reg, m = GradAlign(S.GradAlign(lam=1.0))(ctx_for(model, x, y, eps=1e-8))
    assert abs(reg.item()) < 1e-5
    assert m["gradalign_cos"].item() == pytest.approx(1.0, abs=1e-5)
    torch.manual_seed(0)
    big, _ = GradAlign(S.GradAlign(lam=1.0))(ctx_for(model, x, y, eps=1.0))
    assert big.item() > 1e-4  # a large radius misaligns the gradients


def test_gradalign_reuses_the_clean_fgsm_gradient():
    w, b, x, y = grad_problem()
    model = linear_model(w, b)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g_hand = hand_grad(w, b, x, y)
    res = FGSM(model, 8 / 255).perturb(xt, yt)
    np.testing.assert_allclose(res.grad_init.flatten(1).numpy(), g_hand, rtol=1e-5, atol=1e-7)

    # a start that is not noisy: its gradient is used as ∇ℓ(x), whatever it holds
    v = np.random.default_rng(9).normal(size=g_hand.shape)
    fake = SingleStepResult(res.x_adv, res.x_init, res.logits_init, res.loss_init,
                            torch.from_numpy(v).view_as(xt), noisy=False)
    lam = 0.5
    reg, _ = GradAlign(S.GradAlign(lam=lam))(ctx_for(model, xt, yt, eps=1e-9, start=fake))
    cos = (v * g_hand).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(g_hand, axis=1)
    assert reg.item() == pytest.approx(lam * (1 - cos.mean()), abs=1e-5)
    assert reg.item() > 0.05
    # a noisy start is ignored: ∇ℓ(x) is recomputed, and with a tiny radius reg ≈ 0
    noisy = SingleStepResult(*fake.__dict__.values())
    noisy.noisy = True
    reg2, _ = GradAlign(S.GradAlign(lam=lam))(ctx_for(model, xt, yt, eps=1e-9, start=noisy))
    assert abs(reg2.item()) < 1e-5


def test_gradalign_weight_gradient_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (4,))
    model = mlp(4)
    g1 = torch.randn(4, 1, 4, 4, dtype=torch.float64)  # the (constant) first gradient
    start = SingleStepResult(x, x, x, x, g1, noisy=False)
    reg_fn = GradAlign(S.GradAlign(lam=2.0))

    def reg_at():
        torch.manual_seed(11)  # the same η every time
        return reg_fn(ctx_for(model, x, y, eps=0.2, start=start))[0]

    reg = reg_at()
    reg.backward()  # the regularizer alone: double backprop reaches the weights
    weight = model[1].weight
    assert weight.grad is not None and weight.grad.abs().max() > 1e-4
    assert model[3].weight.grad.abs().max() > 1e-4
    h = 1e-3
    for idx in [(0, 0), (3, 5), (7, 12)]:
        with torch.no_grad():
            weight[idx] += h
        up = reg_at().item()
        with torch.no_grad():
            weight[idx] -= 2 * h
        down = reg_at().item()
        with torch.no_grad():
            weight[idx] += h
        fd = (up - down) / (2 * h)
        assert weight.grad[idx].item() == pytest.approx(fd, rel=1e-3, abs=2e-5)


# ---------------------------------------------------------------------------------- losses
def test_trades_loss_matches_hand_computation():
    rng = np.random.default_rng(6)
    w, b = rng.normal(size=(4, 6)), rng.normal(size=4)
    x = rng.uniform(0, 1, size=(5, 1, 2, 3))
    x_adv = np.clip(x + rng.uniform(-0.2, 0.2, size=x.shape), 0, 1)
    y = rng.integers(0, 4, size=5)
    beta = 6.0
    out = TradesLoss(beta)(linear_model(w, b), torch.from_numpy(x), torch.from_numpy(x_adv),
                           torch.from_numpy(y))
    z, z_adv = x.reshape(5, -1) @ w.T + b, x_adv.reshape(5, -1) @ w.T + b
    lp, lq = np_log_softmax(z), np_log_softmax(z_adv)
    kl = (np.exp(lp) * (lp - lq)).sum(1)
    assert kl.mean() > 1e-2
    expected = np_ce(z, y).mean() + beta * kl.sum() / 5
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(out.logits_adv.detach().numpy(), z_adv, atol=1e-12)
    np.testing.assert_allclose(out.loss_adv.numpy(), np_ce(z_adv, y), rtol=1e-5)
    assert out.loss.requires_grad


def test_trades_attack_objective_uses_the_eval_mode_clean_prediction():
    rng = np.random.default_rng(7)
    w, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    lin = linear_model(w, b)
    model = nn.Sequential(nn.Dropout(p=0.9), lin)
    model.train()
    x = rng.uniform(0, 1, size=(4, 1, 2, 3))
    xt = torch.from_numpy(x)
    torch.manual_seed(0)
    objective, p_clean = TradesLoss(6.0).attack_objective(model, xt, torch.zeros(4).long())
    assert model.training  # mode restored
    expected = np.exp(np_log_softmax(x.reshape(4, -1) @ w.T + b))
    np.testing.assert_allclose(p_clean.numpy(), expected, rtol=1e-6)
    assert objective is kl_to_clean
    # KL(p ‖ softmax(z)) is 0 at the clean logits and the hand KL elsewhere
    z = torch.from_numpy(x.reshape(4, -1) @ w.T + b)
    assert objective(z, p_clean).abs().max() < 1e-6
    z2 = z + torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    kl = (expected * (np.log(expected) - np_log_softmax(z2.numpy()))).sum(1)
    np.testing.assert_allclose(objective(z2, p_clean).numpy(), kl, rtol=1e-5)


def test_ce_with_soft_labels_is_minus_q_log_p():
    rng = np.random.default_rng(8)
    z = rng.normal(size=(5, 4))
    q = rng.uniform(size=(5, 4))
    q /= q.sum(1, keepdims=True)
    got = cross_entropy(torch.from_numpy(z), torch.from_numpy(q)).numpy()
    np.testing.assert_allclose(got, -(q * np_log_softmax(z)).sum(1), rtol=1e-6)
    hard = cross_entropy(torch.from_numpy(z), torch.tensor([0, 3, 1, 2, 2])).numpy()
    np.testing.assert_allclose(hard, np_ce(z, np.array([0, 3, 1, 2, 2])), rtol=1e-6)


def test_ce_loss_is_mean_ce_at_the_adversarial_input():
    rng = np.random.default_rng(9)
    w, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    x_adv = rng.uniform(size=(4, 1, 2, 3))
    y = np.array([2, 0, 1, 1])
    out = CELoss()(linear_model(w, b), torch.zeros(1), torch.from_numpy(x_adv),
                   torch.from_numpy(y))
    ce = np_ce(x_adv.reshape(4, -1) @ w.T + b, y)
    assert out.loss.item() == pytest.approx(ce.mean(), rel=1e-6)
    np.testing.assert_allclose(out.loss_adv.detach().numpy(), ce, rtol=1e-6)


# ---------------------------------------------------------------------------------- Recipe
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_one_step(name):
    spec = job_recipe(name, epsilon="8/255", norm="linf")
    recipe = Recipe(spec, eps=8 / 255, norm="linf")
    model = mlp(5, dtype=torch.float32)
    torch.manual_seed(0)
    x = torch.rand(8, 1, 4, 4)
    y = torch.randint(0, 4, (8,))
    recipe.bind(model, total_steps=10)
    out = recipe.step(model, x, y)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.logits.shape == (8, 4)
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    out.loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().max() > 0 for p in model.parameters())
    recipe.before_optimizer_step(model)
    recipe.after_step(model)
    # the ELLE presets step twice per batch, as the official code — except FGSM + ELLE-A on
    # MNIST (the spec's default dataset), which the validation search set to one step
    assert recipe.optimizer_steps == (2 if "elle" in name and name != "fgsm-elle-a" else 1)


def test_elle_a_steps_twice_on_cifar10_and_once_on_mnist():
    cifar = S.JobSpec.model_validate({"recipe": "fgsm-elle-a", "dataset": {"name": "cifar10"},
                                      "threat": {"epsilon": "8/255"}}).recipe
    assert Recipe(cifar, eps=8 / 255, norm="linf").optimizer_steps == 2
    mnist = S.JobSpec.model_validate({"recipe": "fgsm-elle-a", "dataset": {"name": "mnist"},
                                      "threat": {"epsilon": 0.3}}).recipe
    assert Recipe(mnist, eps=0.3, norm="linf").optimizer_steps == 1


@pytest.mark.parametrize("kind", ["elle", "elle_a"])
def test_optimizer_steps_is_two_only_with_the_official_double_step(kind):
    spec = S.RecipeSpec.model_validate({
        "adversary": {"kind": "fgsm"},
        "regularizers": [{"kind": kind, "official_double_step": True}]})
    assert Recipe(spec, eps=8 / 255, norm="linf").optimizer_steps == 2
    spec = S.RecipeSpec.model_validate({
        "adversary": {"kind": "fgsm"},
        "regularizers": [{"kind": kind}, {"kind": "gradalign"}]})
    assert Recipe(spec, eps=8 / 255, norm="linf").optimizer_steps == 1


def test_trades_gradient_flows_through_clean_and_adversarial_logits():
    # with the identity as "model", x and x_adv are the logits z and z'
    rng = np.random.default_rng(10)
    z_np, za_np = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    y = np.array([0, 2, 1, 1])
    beta = 3.0
    z = torch.tensor(z_np, requires_grad=True)
    za = torch.tensor(za_np, requires_grad=True)
    TradesLoss(beta)(nn.Identity(), z, za, torch.from_numpy(y)).loss.backward()
    lp, lq = np_log_softmax(z_np), np_log_softmax(za_np)
    p, q = np.exp(lp), np.exp(lq)
    onehot = np.eye(3)[y]
    # d/dz' Σ KL(p ‖ q) = q − p ;  d/dz Σ KL(p ‖ q) = p ⊙ (r − ⟨p, r⟩), r = log p − log q
    np.testing.assert_allclose(za.grad.numpy(), beta / 4 * (q - p), rtol=1e-5, atol=1e-7)
    r = lp - lq
    g_kl = p * (r - (p * r).sum(1, keepdims=True))
    np.testing.assert_allclose(z.grad.numpy(), (p - onehot) / 4 + beta / 4 * g_kl,
                               rtol=1e-5, atol=1e-7)
