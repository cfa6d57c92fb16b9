"""Randomized smoothing (defenses/smoothing.py) against exact oracles.

- A linear binary classifier f(x) = [w·x + b > 0] has the exact smoothed top-class probability
  Φ(|w·x + b| / (σ‖w‖)) and the exact certified radius R* = |w·x + b| / ‖w‖.
- A constant classifier has n_A = n, so CERTIFY returns exactly σ·Φ⁻¹(α^(1/n)).
- Coin-flip classifiers (votes independent of the input) fix p_A by construction.
- Models that read a marker in the input, or their position in the forward batch, make the
  vote counts deterministic, which checks packing and counting exactly.

Statistical checks use fixed seeds and thresholds with a 1e-4 binomial tail, so they are
deterministic and would fail only for a real excess over α.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, binomtest, norm
from torch import nn

from bulwark.defenses.smoothing import (
    ABSTAIN,
    CertifyResult,
    Smooth,
    certify_dataset,
    summarize,
)
from bulwark.workers.engine.certification import TSV_COLUMNS, CertifyTSV
from bulwark.workers.engine.models import build_model

SHAPE = (1, 4, 4)  # C, H, W of the toy inputs


# ------------------------------------------------------------------------------ toy models
class Linear(nn.Module):
    """f(x) = [w·x + b > 0] as two logits (−z, z)."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.register_buffer("w", w.flatten().float())
        self.b = float(b)
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += x.shape[0]
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([-z, z], 1)

    def point(self, signed_radius: float) -> torch.Tensor:
        """The input at signed distance ``signed_radius`` from the decision boundary."""
        w = self.w
        return ((signed_radius - self.b / w.norm()) * w / w.norm()).view(SHAPE)


class Constant(nn.Module):
    def __init__(self, num_classes: int, cls: int) -> None:
        super().__init__()
        self.k, self.cls = num_classes, cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.k)
        out[:, self.cls] = 1.0
        return out


class Coin(nn.Module):
    """Class 0 with probability p0, else class 1, whatever the input."""

    def __init__(self, p0: float, seed: int) -> None:
        super().__init__()
        self.p0 = p0
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls1 = torch.rand(x.shape[0], generator=self.gen) >= self.p0
        return nn.functional.one_hot(cls1.long(), 2).float()


class Marker(nn.Module):
    """Reads the input's marker x[0, 0, 0] = 10·j and votes class j mod K (noise ≪ 5)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.k = num_classes
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += x.shape[0]
        j = torch.round(x[:, 0, 0, 0] / 10).long()
        return nn.functional.one_hot(j % self.k, self.k).float()


def marked(j: int) -> torch.Tensor:
    x = torch.full(SHAPE, 0.5)
    x[0, 0, 0] = 10.0 * j
    return x


def linear_model(seed: int = 0, b: float = 0.3) -> Linear:
    g = torch.Generator().manual_seed(seed)
    return Linear(torch.randn(math.prod(SHAPE), generator=g), b)


def tail_threshold(trials: int, p: float, tail: float = 1e-4) -> int:
    """Largest count still consistent with rate ≤ p: P[Bin(trials, p) > threshold] ≤ tail."""
    return int(binom.isf(tail, trials, p))


# ---------------------------------------------------------------- Clopper–Pearson lower bound
@pytest.mark.parametrize("k,n,alpha", [
    (1, 1, 0.05), (1, 10, 0.001), (5, 10, 0.05), (10, 10, 0.01), (50, 100, 0.001),
    (99, 100, 0.05), (500, 1000, 0.01), (937, 1000, 0.001), (99_000, 100_000, 0.001),
    (100_000, 100_000, 0.001),
])
def test_lower_confidence_bound_is_the_clopper_pearson_quantile(k, n, alpha):
    p = Smooth._lower_confidence_bound(k, n, alpha)
    assert isinstance(p, float)
    assert p == pytest.approx(beta.ppf(alpha, k, n - k + 1), rel=1e-12)
    # independently: p solves P[Bin(n, p) >= k] = alpha
    assert binom.sf(k - 1, n, p) == pytest.approx(alpha, rel=1e-6)
    assert 0.0 < p < k / n or (k == n and p == pytest.approx(alpha ** (1 / n), rel=1e-12))


def test_lower_confidence_bound_edges_and_arrays():
    assert Smooth._lower_confidence_bound(0, 100, 0.01) == 0.0
    k = np.array([0, 3, 50, 100])
    out = Smooth._lower_confidence_bound(k, 100, 0.01)
    assert isinstance(out, np.ndarray) and out.shape == (4,)
    assert out[0] == 0.0
    np.testing.assert_allclose(out[1:], beta.ppf(0.01, k[1:], 100 - k[1:] + 1), rtol=1e-12)
    with pytest.raises(ValueError):
        Smooth._lower_confidence_bound(101, 100, 0.01)


# ----------------------------------------------------------------------- closed-form oracles
@pytest.mark.parametrize("n,alpha", [(1, 0.01), (10, 0.001), (10, 0.05), (1000, 0.01),
                                     (100_000, 0.001)])
def test_constant_classifier_certifies_sigma_phi_inv_alpha_pow_1_over_n(n, alpha):
    sigma = 0.37
    smooth = Smooth(Constant(3, cls=2), 3, sigma)
    cls, radius = smooth.certify(torch.rand(SHAPE), n0=100, n=n, alpha=alpha, batch_size=4096)
    p_lower = alpha ** (1.0 / n)
    if p_lower < 0.5:
        assert (cls, radius) == (ABSTAIN, 0.0)
    else:
        assert cls == 2
        assert radius == pytest.approx(sigma * norm.ppf(p_lower), rel=1e-9)
    if (n, alpha) == (100_000, 0.001):  # the largest radius at the paper's defaults: 3.81σ
        assert radius / sigma == pytest.approx(3.81, abs=0.005)


def test_linear_certify_exceeds_exact_radius_at_most_alpha_of_the_time():
    """P[not abstain and (class ≠ g(x) or radius > R*)] ≤ α, pooled over points and trials."""
    torch.manual_seed(1)
    model, sigma, alpha, trials = linear_model(), 0.5, 0.01, 500
    smooth = Smooth(model, 2, sigma)
    signed = [0.05 * sigma, -0.3 * sigma, 1.0 * sigma, -2.0 * sigma]  # R* = |signed|
    xs = torch.stack([model.point(s) for s in signed]).repeat_interleave(trials, 0)
    preds, radii = smooth.certify_batch(xs, n0=100, n=1000, alpha=alpha, batch_size=8192)
    preds, radii = preds.view(len(signed), trials), radii.view(len(signed), trials)
    bad_total = 0
    for row, s in enumerate(signed):
        true_cls, r_star = int(s > 0), abs(s)
        answered = preds[row] != ABSTAIN
        bad = answered & ((preds[row] != true_cls) | (radii[row] > r_star))
        assert int(bad.sum()) <= tail_threshold(trials, alpha), (s, int(bad.sum()))
        bad_total += int(bad.sum())
        assert torch.all(radii[row][~answered] == 0.0)
        if r_star >= sigma:  # far from the boundary: never a wrong class
            assert torch.all(preds[row][answered] == true_cls)
            assert answered.float().mean() > 0.99
    assert bad_total <= tail_threshold(len(signed) * trials, alpha)


def test_linear_certify_is_tight_at_large_n():
    torch.manual_seed(2)
    model, sigma = linear_model(seed=3, b=-0.2), 0.25
    smooth = Smooth(model, 2, sigma)
    signed = [0.5 * sigma, -1.0 * sigma, 1.5 * sigma]
    xs = torch.stack([model.point(s) for s in signed])
    preds, radii = smooth.certify_batch(xs, n0=100, n=100_000, alpha=0.001, batch_size=25_000)
    for s, c, r in zip(signed, preds.tolist(), radii.tolist(), strict=True):
        assert c == int(s > 0)
        assert 0.95 * abs(s) <= r <= abs(s), (s, r)


# ------------------------------------------------------------------ classifiers at chance
def test_certify_abstains_for_a_classifier_at_chance():
    alpha, trials = 0.01, 300
    smooth = Smooth(Coin(0.5, seed=3), 2, 0.25)
    xs = torch.rand(trials, *SHAPE)
    preds, radii = smooth.certify_batch(xs, n0=100, n=1000, alpha=alpha, batch_size=10_000)
    answered = int((preds != ABSTAIN).sum())
    assert answered <= tail_threshold(trials, alpha)  # p_lower ≥ ½ with probability ≤ α
    assert torch.all(radii[preds == ABSTAIN] == 0.0)


def _predict_answer_rate(n: int, alpha: float, p0: float) -> tuple[float, float]:
    """Exact P[PREDICT answers class 0], P[... class 1] for two classes, P[class 0] = p0."""
    k = np.arange(n + 1)  # votes for class 0
    pvals = np.array([binomtest(int(max(i, n - i)), n, 0.5).pvalue for i in k])
    pmf = binom.pmf(k, n, p0)
    answers = pvals <= alpha
    return float(pmf[answers & (k > n - k)].sum()), float(pmf[answers & (k < n - k)].sum())


def test_predict_answers_at_the_exact_rate_for_a_classifier_at_chance():
    n, alpha, trials = 200, 0.1, 600
    smooth = Smooth(Coin(0.5, seed=4), 2, 0.25)
    preds = smooth.predict_batch(torch.rand(trials, *SHAPE), n, alpha, batch_size=8192)
    q0, q1 = _predict_answer_rate(n, alpha, 0.5)
    q = q0 + q1
    assert q <= alpha
    answered = int((preds != ABSTAIN).sum())
    sd = math.sqrt(trials * q * (1 - q))
    assert abs(answered - trials * q) <= 4.5 * sd, (answered, trials * q)


def test_predict_rarely_returns_the_wrong_class_on_a_near_tie():
    n, alpha, trials, p0 = 1000, 0.05, 600, 0.505  # g(x) = class 0 by a hair
    smooth = Smooth(Coin(p0, seed=5), 2, 0.25)
    preds = smooth.predict_batch(torch.rand(trials, *SHAPE), n, alpha, batch_size=50_000)
    wrong = int((preds == 1).sum())
    q0, q1 = _predict_answer_rate(n, alpha, p0)
    assert q1 <= alpha
    assert wrong <= tail_threshold(trials, alpha)
    assert float((preds == ABSTAIN).float().mean()) > 0.8  # it mostly abstains
    one = smooth.predict(torch.rand(SHAPE), 100, alpha, 64)
    assert isinstance(one, int) and one in (ABSTAIN, 0, 1)


# ------------------------------------------------------------------ packing and counting
def test_sample_noise_packs_inputs_into_batches_exactly():
    """Class = position in the forward batch mod K: counts follow from the input-major layout."""
    k, n_inputs, num, bs = 3, 5, 37, 16

    class Position(nn.Module):
        def forward(self, x):
            return nn.functional.one_hot(torch.arange(x.shape[0]) % k, k).float()

    counts = Smooth(Position(), k, 0.1)._sample_noise(torch.rand(n_inputs, *SHAPE), num, bs)
    assert counts.dtype == torch.long and counts.shape == (n_inputs, k)
    expected = np.zeros((n_inputs, k), dtype=np.int64)
    for i in range(n_inputs):
        for s in range(num):
            expected[i, ((i * num + s) % bs) % k] += 1
    np.testing.assert_array_equal(counts.numpy(), expected)
    assert torch.all(counts.sum(1) == num)


def test_sample_noise_votes_land_on_their_own_input():
    k, num = 4, 53
    smooth = Smooth(Marker(k), k, 0.1)
    xs = torch.stack([marked(j) for j in range(7)])
    for bs in (1, 10, 53, 100, 1000):
        counts = smooth._sample_noise(xs, num, bs)
        expected = np.zeros((7, k), dtype=np.int64)
        expected[np.arange(7), np.arange(7) % k] = num
        np.testing.assert_array_equal(counts.numpy(), expected)


def test_sample_noise_buffers_in_groups(monkeypatch):
    k = 4
    smooth = Smooth(Marker(k), k, 0.1)
    monkeypatch.setattr(smooth, "max_buffered_samples", 60)  # 2 inputs per group at num=25
    counts = smooth._sample_noise(torch.stack([marked(j) for j in range(5)]), 25, 7)
    assert counts[np.arange(5), np.arange(5) % k].tolist() == [25] * 5


def test_certify_batch_equals_a_loop_of_certify():
    k, sigma = 3, 0.2
    smooth = Smooth(Marker(k), k, sigma)
    xs = torch.stack([marked(j) for j in range(7)])
    preds, radii = smooth.certify_batch(xs, n0=20, n=300, alpha=0.01, batch_size=128)
    single = [smooth.certify(x, n0=20, n=300, alpha=0.01, batch_size=128) for x in xs]
    assert preds.dtype == torch.long and radii.dtype == torch.float64
    assert preds.tolist() == [c for c, _ in single] == [j % k for j in range(7)]
    assert radii.tolist() == [r for _, r in single]
    assert radii[0] == pytest.approx(sigma * norm.ppf(0.01 ** (1 / 300)), rel=1e-12)
    assert smooth.predict_batch(xs, 300, 0.01, 128).tolist() == [
        smooth.predict(x, 300, 0.01, 128) for x in xs]


def test_certify_draws_fresh_samples_for_the_estimate():
    n0, n, alpha, sigma = 30, 400, 0.01, 0.5
    smooth = Smooth(Marker(2), 2, sigma)
    calls = []
    original = smooth._sample_noise

    def recording(xs, num, batch_size):
        calls.append(num)
        return original(xs, num, batch_size)

    smooth._sample_noise = recording
    smooth.certify(marked(1), n0, n, alpha, 64)
    assert calls == [n0, n]

    # The class comes from the first draw, n_A only from the second.
    draws = iter([torch.tensor([[0, n0]]), torch.tensor([[n - 300, 300]])])
    smooth._sample_noise = lambda xs, num, batch_size: next(draws)
    cls, radius = smooth.certify(marked(0), n0, n, alpha, 64)
    assert cls == 1
    assert radius == pytest.approx(sigma * norm.ppf(beta.ppf(alpha, 300, n - 300 + 1)), rel=1e-12)


def test_noise_is_gaussian_in_pixel_space_unclipped_and_eval_mode_restored():
    seen, modes = [], []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            seen.append(x.clone())
            modes.append((self.training, self.drop.training))
            return self.drop(x.new_zeros(x.shape[0], 2))

    model = Recorder().train()
    model.drop.eval()  # mixed modes must come back as they were
    sigma = 0.8
    Smooth(model, 2, sigma).certify(torch.full(SHAPE, 0.5), 16, 2000, 0.01, 500)
    assert modes and all(m == (False, False) for m in modes)
    assert model.training and not model.drop.training
    noise = torch.cat(seen) - 0.5
    assert noise.shape == (2016, *SHAPE)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(noise.std()) == pytest.approx(sigma, rel=0.01)
    assert float(noise.min()) < -0.5 and float(noise.max()) > 0.5  # not clipped to [0, 1]


def test_generator_makes_certify_reproducible():
    model = linear_model()
    x = model.point(0.1)

    def run(seed):
        smooth = Smooth(model, 2, 0.5, generator=torch.Generator().manual_seed(seed))
        return smooth.certify_batch(torch.stack([x, x]), 100, 500, 0.01, 256)

    (p1, r1), (p2, r2), (_, r3) = run(7), run(7), run(8)
    assert torch.equal(p1, p2) and torch.equal(r1, r2)
    assert not torch.equal(r1, r3)


def test_small_cnn_bf16_channels_last_runs():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=28,
                        mean=(0.1307,), std=(0.3081,))
    smooth = Smooth(model, 10, 0.25, precision="bf16", channels_last=True)
    preds, radii = smooth.certify_batch(torch.rand(2, 1, 28, 28), 8, 40, 0.01, 32)
    assert preds.shape == (2,) and radii.shape == (2,)
    assert all(-1 <= c < 10 for c in preds.tolist()) and torch.all(radii >= 0)
    counts = smooth._sample_noise(torch.rand(3, 1, 28, 28), 20, 16)
    assert counts.sum(1).tolist() == [20, 20, 20]


def test_argument_checks():
    smooth = Smooth(Constant(2, 0), 2, 0.5)
    with pytest.raises(ValueError):
        smooth.certify(torch.rand(SHAPE), 0, 10, 0.01, 8)
    with pytest.raises(ValueError):
        smooth.certify(torch.rand(SHAPE), 10, 10, 1.5, 8)
    with pytest.raises(ValueError):
        smooth.certify(torch.rand(2, *SHAPE), 10, 10, 0.01, 8)
    with pytest.raises(ValueError):
        Smooth(Constant(2, 0), 2, 0.0)
    with pytest.raises(ValueError):
        Smooth(Constant(3, 0), 2, 0.5).certify(torch.rand(SHAPE), 1, 10, 0.01, 8)


# ------------------------------------------------------------------ certify_dataset / resume
def _rows(path):
    lines = path.read_text().splitlines()
    assert tuple(lines[0].split("\t")) == TSV_COLUMNS
    return [line.split("\t")[:5] for line in lines[1:]]


def test_certify_dataset_resumes_from_its_state_file(tmp_path):
    model = linear_model(seed=4, b=0.1)
    smooth = Smooth(model, 2, 0.5)
    signed = [0.4, -0.2, 0.05, 0.9, -0.6]
    x = torch.stack([model.point(s) for s in signed])
    y = [1, 0, 0, 1, 1]  # two wrong labels: correct must follow predict == label
    idx = [0, 20, 40, 60, 80]
    kw = dict(n0=20, n=200, alpha=0.01, batch_size=64, chunk=2, seed=11, idx=idx)
    state = tmp_path / "certify.tsv"
    progress = []
    first = certify_dataset(smooth, x, y, store=CertifyTSV(state), on_progress=progress.append,
                            **kw)
    assert model.samples == 5 * 220
    assert first.idx == idx and first.label == y
    assert first.correct == [int(p == t) for p, t in zip(first.predict, first.label, strict=True)]
    assert [r[0] for r in _rows(state)] == [str(i) for i in idx]
    assert [p["done"] for p in progress] == [2, 4, 5]
    assert all(p["total"] == 5 and p["samples_per_second"] > 0 for p in progress)
    assert progress[0]["eta_seconds"] is None and progress[1]["eta_seconds"] is not None
    assert progress[-1]["eta_seconds"] == 0.0

    # Crash after the first chunk, half-way through writing the next row.
    lines = state.read_text().splitlines(keepends=True)
    state.write_text("".join(lines[:3]) + lines[3][:5])
    model.samples = 0
    second = certify_dataset(smooth, x, y, store=CertifyTSV(state), **kw)
    assert model.samples == 3 * 220  # only the missing inputs
    for name in ("idx", "label", "predict", "radius", "correct"):
        assert getattr(second, name) == getattr(first, name)
    assert len(_rows(state)) == 5 and state.read_text().endswith("\n")

    model.samples = 0
    third = certify_dataset(smooth, x, y, store=CertifyTSV(state), **kw)
    assert model.samples == 0 and third.radius == first.radius

    with pytest.raises(ValueError, match="other settings"):
        certify_dataset(smooth, x, y, store=CertifyTSV(state), **{**kw, "n": 300})
    with pytest.raises(ValueError, match="not an input"):
        certify_dataset(smooth, x[:2], y[:2], store=CertifyTSV(state), **{**kw, "idx": [0, 20]})


def test_certify_dataset_without_state_matches_certify_batch():
    k = 3
    smooth = Smooth(Marker(k), k, 0.1)
    x = torch.stack([marked(j) for j in range(5)])
    res = certify_dataset(smooth, x, torch.tensor([0, 1, 1, 0, 1]), n0=10, n=100, alpha=0.01,
                          batch_size=64, chunk=3)
    preds, radii = smooth.certify_batch(x, 10, 100, 0.01, 64)
    assert res.predict == preds.tolist() and res.radius == radii.tolist()
    assert res.correct == [1, 1, 0, 1, 1] and len(res.seconds) == 5


# ------------------------------------------------------------------------------ metrics
def test_summarize_by_hand():
    res = CertifyResult(idx=[0, 1, 2, 3, 4], label=[0, 1, 2, 0, 1],
                        predict=[0, 1, ABSTAIN, 1, 1], radius=[0.3, 1.2, 0.0, 0.8, 0.1],
                        correct=[1, 1, 0, 0, 1], seconds=[1.0] * 5)
    out = summarize(res, radii=(0.0, 0.25, 0.5, 1.0, 1.2, 1.5))
    assert out["certified_accuracy"] == {0.0: 0.6, 0.25: 0.4, 0.5: 0.2, 1.0: 0.2, 1.2: 0.2,
                                         1.5: 0.0}
    assert out["acr"] == pytest.approx((0.3 + 1.2 + 0.1) / 5)
    assert out["abstain_rate"] == pytest.approx(0.2)
    assert out["num_points"] == 5
    assert set(summarize(res)["certified_accuracy"]) == {0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0}
