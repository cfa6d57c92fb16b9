"""The evaluation suite against oracles: closed-form robustness of linear classifiers, hand
counts, and a scripted attack for the worst-case-over-restarts bookkeeping."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from bulwark.attacks.evaluation import (
    AttackResult,
    _autoattack,
    _run_attack,
    autoattack_eval,
    check_image_range,
    clean_accuracy,
    fgsm_eval,
    pgd_eval,
)
from bulwark.workers.engine.models import build_model

SHAPE = (1, 4, 4)
DIM = 16
EPS = {"linf": 0.015, "l2": 0.045}
DUAL = {"linf": 1.0, "l2": 2.0}  # ||.||_1 is dual to L∞, ||.||_2 to L2


# ----------------------------------------------------------------------------- linear oracle
def _linear_model(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(DIM, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, DIM, generator=g))
        # decision boundary through the centre of the cube [0.4, 0.6]^d
        lin.bias.copy_(-lin.weight @ torch.full((DIM,), 0.5))
    return nn.Sequential(nn.Flatten(), lin)


def _radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str) -> torch.Tensor:
    """Exact minimal perturbation (in ``norm``, box ignored) that flips a 2-class linear model;
    negative when the point is already misclassified."""
    lin = model[1]
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    v = w[y] - w[1 - y]
    margin = (v * x.flatten(1).double()).sum(1) + b[y] - b[1 - y]
    return margin / v.norm(p=DUAL[norm], dim=1)


def _linear_problem(norm: str, n: int = 80, seed: int = 0):
    """Points in [0.4, 0.6]^d (the eps ball never reaches the box), mostly correctly labelled,
    none within 10% of eps of the decision boundary."""
    model = _linear_model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = 0.4 + 0.2 * torch.rand(n, *SHAPE, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.rand(n, generator=g) < 0.2
    y[flip] = 1 - y[flip]
    eps = EPS[norm]
    r = _radius(model, x, y, norm)
    keep = (r - eps).abs() > 0.1 * eps
    x, y, r = x[keep], y[keep], r[keep]
    expected_robust = r > eps
    # the oracle is only informative with both outcomes well represented
    assert 0.25 < expected_robust.double().mean() < 0.75
    assert (r < 0).sum() >= 5
    return model, x, y, eps, expected_robust


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_matches_closed_form_robustness_of_linear_model(norm):
    model, x, y, eps, expected = _linear_problem(norm)
    res = pgd_eval(model, x, y, eps=eps, norm=norm, steps=20, restarts=2, batch_size=32)
    assert torch.equal(res.robust, expected) and res.images is None  # kept only when asked
    assert res.correct == int(expected.sum())
    assert res.n == len(x)
    assert res.acc == pytest.approx(expected.double().mean().item())
    assert res.name == "pgd20-2"
    assert res.params["alpha"] == pytest.approx(eps / 4)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_is_exact_on_linear_model(norm):
    model, x, y, eps, expected = _linear_problem(norm, seed=3)
    robust = fgsm_eval(model, x, y, eps=eps, norm=norm, batch_size=16).robust
    assert torch.equal(robust, expected)
    res = fgsm_eval(model, x, y, eps=eps, norm=norm)
    assert (res.name, res.n, res.correct) == ("fgsm", len(x), int(expected.sum()))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_ce_matches_closed_form_robustness_of_linear_model(norm):
    model, x, y, eps, expected = _linear_problem(norm, seed=5)
    res = autoattack_eval(
        model, x, y, eps=eps, norm=norm, version="apgd-ce", num_classes=2, steps=20
    )
    assert (res.name, res.n, res.correct) == ("autoattack-apgd-ce", len(x), int(expected.sum()))


def test_clean_accuracy_matches_hand_count():
    model = _linear_model()
    x = 0.4 + 0.2 * torch.rand(50, *SHAPE, generator=torch.Generator().manual_seed(7))
    w, b = model[1].weight.detach(), model[1].bias.detach()
    scores = x.flatten(1) @ w.T + b
    y = torch.randint(0, 2, (50,), generator=torch.Generator().manual_seed(8))
    hand = sum(int(scores[i, y[i]] > scores[i, 1 - y[i]]) for i in range(50))
    res = clean_accuracy(model, x, y, batch_size=7)
    assert (res.name, res.n, res.correct) == ("clean", 50, hand)
    assert res.acc == hand / 50
    assert res.to_dict() == {"acc": hand / 50, "n": 50, "params": {}}


# ----------------------------------------------------------------------- restart bookkeeping
class _ThresholdModel(nn.Module):
    """Class 1 iff the first pixel exceeds 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        p = x[:, 0, 0, 0] - 0.5 + self.dummy
        return torch.stack([-p, p], dim=1)


def test_restarts_take_worst_case_per_example_and_skip_fooled_points():
    model = _ThresholdModel()
    x = torch.full((8, 1, 2, 2), 0.25)
    x[4:, 0, 0, 0] = 0.75
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])  # ids 3 and 7 are misclassified clean
    # scripted attack: restart r fools the examples listed in fools[r] (by their value tag)
    x[:, 0, 1, 1] = torch.arange(8) / 10  # tag each example in a pixel the model ignores
    fools = [{0, 4}, {0, 1}, {5}]
    seen: list[set[int]] = []

    def attack(xb, yb):
        tags = {round(float(t) * 10) for t in xb[:, 0, 1, 1]}
        seen.append(tags)
        adv = xb.clone()
        for i, t in enumerate(xb[:, 0, 1, 1]):
            if round(float(t) * 10) in fools[len(seen) - 1]:
                adv[i, 0, 0, 0] = 1.0 - adv[i, 0, 0, 0]
        return adv

    x_adv, robust = _run_attack(model, attack, x, y, restarts=3, batch_size=8)
    assert seen == [{0, 1, 2, 4, 5, 6}, {1, 2, 5, 6}, {2, 5, 6}]
    assert robust.tolist() == [False, False, True, False, False, False, True, False]
    # fooled examples keep the image that fooled them; unattacked ones stay clean
    assert torch.equal(x_adv[[3, 7]], x[[3, 7]])
    assert x_adv[0, 0, 0, 0] == 0.75 and x_adv[4, 0, 0, 0] == 0.25


# ------------------------------------------------------------------------- nonlinear models
def _sharp_small_cnn() -> nn.Module:
    """Random-init SmallCNN on 8x8; the small std makes the logits input-sensitive, so
    attacks succeed on some points at small eps and fail on others."""
    torch.manual_seed(0)
    return build_model(
        "small_cnn", num_classes=10, in_channels=1, image_size=8, mean=(0.5,), std=(0.02,)
    )


@pytest.fixture(scope="module")
def cnn_problem():
    model = _sharp_small_cnn()
    x = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x[:4] = x[:4].round()  # points on the box corners, where [0, 1] clipping binds
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 10  # two clean errors
    return model, x, y


def test_more_restarts_never_increase_robust_accuracy(cnn_problem):
    model, x, y = cnn_problem
    kw = dict(eps=0.03, steps=5, batch_size=10, seed=0)
    rob1 = pgd_eval(model, x, y, restarts=1, **kw).robust
    rob3 = pgd_eval(model, x, y, restarts=3, **kw).robust
    assert not (rob3 & ~rob1).any()  # the first restart is shared: a subset, per example
    r1 = pgd_eval(model, x, y, restarts=1, **kw)
    r3 = pgd_eval(model, x, y, restarts=3, **kw)
    assert r3.acc <= r1.acc
    assert r1.n == r3.n == len(x)
    assert r3.name == "pgd5-3"
    clean = clean_accuracy(model, x, y)
    assert clean.correct == len(x) - 2
    assert r1.correct < clean.correct  # the attack does something on this model


class _Book:
    """A ledger in a dict, recording which batches were handed to it."""

    def __init__(self):
        self.batches: dict[tuple[int, int], list[bool]] = {}
        self.puts: list[tuple[int, int]] = []

    def get(self, start, stop):
        return self.batches.get((start, stop))

    def put(self, start, stop, robust):
        self.batches[(start, stop)] = list(robust)
        self.puts.append((start, stop))


class _Stop(Exception):
    pass


def test_a_stopped_pgd_evaluation_resumes_from_its_ledger(cnn_problem):
    model, x, y = cnn_problem
    kw = dict(eps=0.03, steps=5, restarts=2, batch_size=6, seed=0)
    whole = pgd_eval(model, x, y, **kw).robust
    assert 0 < whole.sum() < len(x) - 2, "some points robust, some not: the mask says something"

    def stop_at_12(done, total):
        if done >= 12:
            raise _Stop

    book = _Book()
    with pytest.raises(_Stop):
        pgd_eval(model, x, y, progress=stop_at_12, ledger=book, **kw)
    assert book.puts == [(0, 6), (6, 12)]
    resumed = pgd_eval(model, x, y, ledger=book, **kw).robust
    assert book.puts[2:] == [(12, 18), (18, 24)], "only the unfinished batches are attacked"
    assert torch.equal(resumed, whole)
    # a batch's result does not depend on the batches before it: a ledger that claims every
    # point of the first batch robust changes that batch alone
    forged = _Book()
    forged.batches[(0, 6)] = [True] * 6
    mixed = pgd_eval(model, x, y, ledger=forged, **kw).robust
    assert mixed[:6].all() and torch.equal(mixed[6:], whole[6:])
    r = pgd_eval(model, x, y, ledger=book, **kw)
    assert r.correct == int(whole.sum())


def _assert_in_threat_model(x, x_adv, eps, norm):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.5)])
def test_adversarial_images_stay_in_eps_ball_and_box(cnn_problem, norm, eps):
    model, x, y = cnn_problem
    res = pgd_eval(model, x, y, eps=eps, norm=norm, steps=5, restarts=2, keep_images=True)
    adv, robust = res.images, res.robust
    _assert_in_threat_model(x, adv, eps, norm)
    assert torch.equal(adv[:2], x[:2])  # clean errors are not attacked
    with torch.no_grad():
        assert torch.equal(model(adv).argmax(1) == y, robust)
    adv = fgsm_eval(model, x, y, eps=eps, norm=norm, keep_images=True).images
    _assert_in_threat_model(x, adv, eps, norm)
    res = autoattack_eval(model, x, y, eps=eps, norm=norm, version="apgd-ce", steps=5,
                          keep_images=True)
    adv, robust = res.images, res.robust
    _assert_in_threat_model(x, adv, eps, norm)
    with torch.no_grad():
        assert torch.equal(model(adv).argmax(1) == y, robust)


@pytest.mark.parametrize("version", ["apgd-ce", "apgd-t"])
def test_autoattack_apgd_versions(cnn_problem, version):
    model, x, y = cnn_problem
    x, y = x[:12], y[:12]
    clean = clean_accuracy(model, x, y)
    res = autoattack_eval(model, x, y, eps=0.03, version=version, num_classes=10, steps=10)
    assert res.name == f"autoattack-{version}"
    assert res.n == 12
    assert res.acc <= clean.acc
    assert res.params == {
        "eps": 0.03, "norm": "linf", "version": version, "num_classes": 10, "steps": 10,
        "seed": 0,
    }
    json.dumps(res.to_dict())


def test_apgd_ce_then_apgd_t_is_apgd_t_on_what_apgd_ce_left(cnn_problem):
    # oracle: the two attacks run one after the other by hand
    model, x, y = cnn_problem
    kw = {"eps": 0.03, "num_classes": 10, "steps": 10}
    ce = autoattack_eval(model, x, y, version="apgd-ce", **kw).robust
    t = autoattack_eval(model, x[ce], y[ce], version="apgd-t", **kw).robust
    expected = ce.clone()
    expected[ce] = t
    res = autoattack_eval(model, x, y, version="apgd-ce+apgd-t", **kw, keep_images=True)
    adv, robust = res.images, res.robust
    assert 0 < int(ce.sum()) and int(expected.sum()) < int(ce.sum()), "both stages must bite"
    assert torch.equal(robust, expected)
    _assert_in_threat_model(x, adv, 0.03, "linf")
    assert torch.equal(model(adv).argmax(1) == y, robust)


def test_autoattack_standard_wires_up(cnn_problem):
    # eps large enough that APGD-CE fools every point, so the cascade stops after it.
    model, x, y = cnn_problem
    res = autoattack_eval(model, x[2:8], y[2:8], eps=0.25, version="standard", steps=10)
    assert (res.name, res.n, res.acc) == ("autoattack-standard", 6, 0.0)


def test_autoattack_standard_uses_reference_iteration_counts(cnn_problem):
    # torchattacks.AutoAttack leaves its sub-attacks at 10 steps; the reference uses 100.
    model = cnn_problem[0]
    atk = _autoattack(
        model, eps=0.03, ta_norm="Linf", version="standard", num_classes=10, steps=100,
        seed=0, device=torch.device("cpu"),
    )
    subs = atk._autoattack.attacks
    assert [type(a).__name__ for a in subs] == ["APGD", "APGDT", "FAB", "Square"]
    assert [getattr(a, "steps", None) for a in subs[:3]] == [100, 100, 100]
    assert subs[3].n_queries == 5000
    assert all(a.seed == 0 and a.eps == 0.03 for a in subs)
    assert subs[1].n_target_classes == 9 and subs[2].multi_targeted


@pytest.mark.slow
def test_autoattack_standard_full_cascade(cnn_problem):
    model, x, y = cnn_problem
    x, y = x[:8], y[:8]
    apgd = autoattack_eval(model, x, y, eps=0.01, version="apgd-ce", steps=20)
    start = time.perf_counter()
    res = autoattack_eval(model, x, y, eps=0.01, version="standard", steps=20, keep_images=True)
    adv, robust = res.images, res.robust
    assert time.perf_counter() - start < 600
    _assert_in_threat_model(x, adv, 0.01, "linf")
    assert int(robust.sum()) <= apgd.correct  # APGD-CE is the cascade's first stage


# -------------------------------------------------------------------------------- contracts
def test_check_image_range_rejects_pixels_and_integers():
    check_image_range(torch.rand(2, 1, 4, 4))
    check_image_range(torch.tensor([0.0, 1.0 + 5e-7, -5e-7]))
    with pytest.raises(ValueError, match=r"inputs must be images in \[0,1\]"):
        check_image_range(torch.rand(2, 1, 4, 4) * 255)
    with pytest.raises(ValueError, match=r"inputs must be images in \[0,1\]"):
        check_image_range(torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"inputs must be images in \[0,1\]"):
        check_image_range(torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match=r"inputs must be images in \[0,1\]"):
        check_image_range(torch.tensor([0.5, float("nan")]))


@pytest.mark.parametrize(
    "fn",
    [
        lambda m, x, y: clean_accuracy(m, x, y),
        lambda m, x, y: fgsm_eval(m, x, y, eps=0.1),
        lambda m, x, y: pgd_eval(m, x, y, eps=0.1, steps=1, restarts=1),
        lambda m, x, y: autoattack_eval(m, x, y, eps=0.1, version="apgd-ce", num_classes=2),
    ],
)
def test_every_eval_rejects_unscaled_images(fn):
    model = _linear_model()
    x = torch.rand(4, *SHAPE) * 255
    with pytest.raises(ValueError, match="normalization belongs inside the model"):
        fn(model, x, torch.zeros(4, dtype=torch.long))


class _BNDropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
            nn.Dropout(0.5), nn.Linear(4 * 16, 3),
        )

    def forward(self, x):
        return self.body(x)


def test_eval_mode_rng_and_grads_are_restored():
    torch.manual_seed(0)
    model = _BNDropNet()
    model.train()
    model.body[1].eval()  # a frozen BatchNorm inside a training model: mixed modes survive
    frozen = model.body[0].weight
    frozen.requires_grad_(False)
    stats = model.body[1].running_mean.clone()
    x = torch.rand(10, *SHAPE)
    y = torch.randint(0, 3, (10,))
    rng = torch.get_rng_state()
    with torch.no_grad():  # attacks must still get their gradients
        a = pgd_eval(model, x, y, eps=0.05, steps=3, restarts=2, batch_size=4, seed=3)
        b = pgd_eval(model, x, y, eps=0.05, steps=3, restarts=2, batch_size=4, seed=3)
        autoattack_eval(model, x, y, eps=0.05, version="apgd-ce", num_classes=3, steps=3)
    assert a == b  # deterministic for a given seed, dropout off
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and model.body[4].training and not model.body[1].training
    assert torch.equal(model.body[1].running_mean, stats)  # BN ran in eval mode
    assert not frozen.requires_grad and model.body[5].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_argument_errors():
    model = _linear_model()
    x = 0.4 + 0.2 * torch.rand(4, *SHAPE)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="4 classes"):
        autoattack_eval(model, x, y, eps=0.1, version="apgd-t", num_classes=2)
    with pytest.raises(ValueError, match="outputs 2 logits"):
        autoattack_eval(model, x, y, eps=0.1, version="apgd-ce", num_classes=10)
    with pytest.raises(ValueError, match="version"):
        autoattack_eval(model, x, y, eps=0.1, version="plus", num_classes=2)
    with pytest.raises(ValueError, match="norm"):
        pgd_eval(model, x, y, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="eps"):
        fgsm_eval(model, x, y, eps=0.0)
    with pytest.raises(ValueError, match="labels"):
        clean_accuracy(model, x, y.float())
    with pytest.raises(ValueError, match="one entry per input"):
        clean_accuracy(model, x, y[:3])
    with pytest.raises(ValueError, match="model is on meta"):
        clean_accuracy(_linear_model().to("meta"), x, y)


def test_attack_result_to_dict_is_json():
    r = AttackResult(name="pgd50-10", acc=0.5, n=4, correct=2, params={"eps": 0.1})
    assert json.loads(json.dumps(r.to_dict())) == {"acc": 0.5, "n": 4, "params": {"eps": 0.1}}
