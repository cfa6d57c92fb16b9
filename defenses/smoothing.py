"""Randomized smoothing: PREDICT and CERTIFY (Cohen, Rosenfeld & Kolter, ICML 2019).

The smoothed classifier is g(x) = argmax_c P_{η ~ N(0, σ²I)}[f(x + η) = c]. If p̲_A is a lower
bound on the probability of g's top class, g is constant on the ℓ2 ball of radius
σ·Φ⁻¹(p̲_A) around x (Theorem 1 of the paper). :class:`Smooth` follows the reference
``code/core.py`` of ``locuslab/smoothing`` (the methods keep the paper's names) with one change
of mechanics, not of statistics: the Monte Carlo samples of several inputs are packed into full
batches, the noise is drawn on the device and the votes are counted there with one
``torch.bincount`` per call, so nothing runs per sample in Python and the host sees one
transfer per batch of inputs.

Conventions (as in the reference; docs/methods.md, "Randomized smoothing"):

- Inputs are images in [0, 1]; the noise is added in that pixel space *before* the model, whose
  normalization is its first layer. Noisy inputs are not clipped to [0, 1].
- Votes are hard argmaxes of the logits, never averaged softmax.
- The base model runs in eval mode (set for the call, the previous modes restored afterwards).
- Randomness: noise comes from ``Smooth.generator`` when set (a ``torch.Generator`` on the
  model's device), else from torch's global RNG (``torch.manual_seed`` makes a run repeatable).
  The values drawn depend on the packing (``batch_size``, which inputs share a call) and on the
  memory layout (``channels_last``), so results are reproducible for a fixed configuration.

:func:`certify_dataset` runs CERTIFY over a test set in chunks, resumable through a
:class:`RowStore` (the job's ``certify.tsv`` in the reference's format lives with the engine,
``bulwark.workers.engine.certification``, so this module holds no file handling);
:func:`summarize` turns the rows into certified accuracy per radius, ACR and abstain rate.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor, nn

from bulwark.defenses.precision import autocast

ABSTAIN = -1
PRECISIONS = ("fp32", "bf16", "fp16")
ROW_FIELDS = ("idx", "label", "predict", "radius", "correct", "seconds")  # a CertifyResult row
Row = tuple[int, int, int, float, int, float]  # ROW_FIELDS' values for one input


class RowStore(Protocol):
    """Where ``certify_dataset`` keeps finished rows so that a stopped run resumes."""

    def load(self, settings: dict[str, Any], *, writer: bool) -> list[Row]:
        """The rows already made with these settings (refusing rows made with others)."""

    def append(self, rows: list[Row]) -> None:
        """Keep these rows (called after every chunk, by one process)."""
Exchange = Callable[[list[Row]], list[Row]]    # every rank's rows of a round, in chunk order


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class Smooth:
    """A smoothed classifier g built from a base classifier f and a noise level σ.

    ``base_model`` maps [B, C, H, W] images in [0, 1] to [B, num_classes] logits. ``precision``
    ("fp32", "bf16", "fp16") runs its forward under ``bulwark.defenses.precision.autocast``;
    ``channels_last=True`` converts the model (in place, as the runner does) and feeds it
    channels_last batches. ``generator`` (a ``torch.Generator`` on the model's device) is the
    source of the noise; ``None`` uses torch's global RNG.
    """

    ABSTAIN = ABSTAIN
    # Most votes (int64) buffered on the device per inner call: 2**23 = 64 MiB.
    max_buffered_samples = 1 << 23

    def __init__(self, base_model: nn.Module, num_classes: int, sigma: float, *,
                 precision: str = "fp32", channels_last: bool = False,
                 generator: torch.Generator | None = None,
                 check: Callable[[], None] | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.base_model = base_model
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.generator = generator
        self.check = check  # called every few noise batches; it may raise to stop the work
        self.device = _model_device(base_model)
        if self.channels_last:
            base_model.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ the paper's algorithms
    def predict(self, x: Tensor, n: int, alpha: float, batch_size: int) -> int:
        """PREDICT: g(x) from n noisy samples, or ABSTAIN.

        With probability at least 1 − α over the noise, the class returned equals g(x): the top
        two counts n_A, n_B go through the two-sided binomial test of n_A ~ Bin(n_A + n_B, ½),
        and the method abstains when its p-value exceeds α (Hung & Fithian, arXiv:1610.03944).
        """
        return int(self.predict_batch(self._one(x), n, alpha, batch_size)[0])

    def certify(self, x: Tensor, n0: int, n: int, alpha: float,
                batch_size: int) -> tuple[int, float]:
        """CERTIFY: (ĉ_A, R) such that g is constant, equal to ĉ_A, within ℓ2 radius R of x.

        With probability at least 1 − α over the noise, the class returned equals g(x) and g's
        prediction is robust within the ℓ2 ball of radius R = σ·Φ⁻¹(p̲_A) around x; ĉ_A comes
        from n0 selection samples and p̲_A from n fresh ones. Returns (ABSTAIN, 0.0) when
        p̲_A < ½.
        """
        pred, radius = self.certify_batch(self._one(x), n0, n, alpha, batch_size)
        return int(pred[0]), float(radius[0])

    def predict_batch(self, xs: Tensor, n: int, alpha: float, batch_size: int) -> Tensor:
        """PREDICT for each of N inputs [N, C, H, W] → long [N] (ABSTAIN where abstained).

        The same guarantee as :meth:`predict` holds for each input separately (each has its own
        noise): with probability at least 1 − α, that input's answer is g(x) or ABSTAIN.
        """
        _check_counts(n=n, batch_size=batch_size)
        _check_alpha(alpha)
        counts = self._sample_noise(xs, n, batch_size)
        top = counts.topk(2, dim=1)
        top2_counts, top2_classes = torch.cat([top.values, top.indices], 1).cpu().split(2, 1)
        preds = torch.full((counts.shape[0],), ABSTAIN, dtype=torch.long)
        for i, ((n_a, n_b), c_a) in enumerate(zip(top2_counts.tolist(),
                                                  top2_classes[:, 0].tolist(), strict=True)):
            if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
                preds[i] = c_a
        return preds

    def certify_batch(self, xs: Tensor, n0: int, n: int, alpha: float,
                      batch_size: int) -> tuple[Tensor, Tensor]:
        """CERTIFY for each of N inputs [N, C, H, W] → (long [N] classes, float64 [N] radii).

        Per input, the guarantee of :meth:`certify`: with probability at least 1 − α the class
        is g(x) and g is constant within the returned radius. Abstentions are (ABSTAIN, 0.0).
        The n0 selection samples and the n estimation samples are two separate draws.
        """
        _check_counts(n0=n0, n=n, batch_size=batch_size)
        _check_alpha(alpha)
        xs = xs.to(self.device, torch.float32)  # moved once for both draws
        c_hat = self._sample_noise(xs, n0, batch_size).argmax(1)  # selection: n0 samples
        counts = self._sample_noise(xs, n, batch_size)  # estimation: n fresh samples
        n_a = counts.gather(1, c_hat[:, None])[:, 0]
        c_hat, n_a = torch.stack([c_hat, n_a]).cpu().numpy()  # one host transfer
        p_lower = np.asarray(self._lower_confidence_bound(n_a, n, alpha), dtype=np.float64)
        certified = p_lower >= 0.5
        radius = np.where(certified, self.sigma * norm.ppf(np.where(certified, p_lower, 0.5)),
                          0.0)
        preds = np.where(certified, c_hat, ABSTAIN)
        return torch.from_numpy(preds.astype(np.int64)), torch.from_numpy(radius)

    def _sample_noise(self, xs: Tensor, num: int, batch_size: int) -> Tensor:
        """Votes of f over ``num`` noisy copies x + η, η ~ N(0, σ²I), of each input.

        Returns long counts [N, num_classes] on the model's device; each row sums to ``num``.
        The N·num samples are laid out input-major (sample j of input i is number i·num + j) and
        cut into forward batches of ``batch_size``, so a batch may hold the samples of several
        inputs and only the last one is partial (per group of inputs whose votes fit in
        ``max_buffered_samples``).
        """
        if xs.ndim != 4:
            raise ValueError(f"expected inputs [N, C, H, W], got shape {tuple(xs.shape)}")
        xs = xs.to(self.device, torch.float32)
        if self.channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        if xs.shape[0] == 0:
            return torch.zeros((0, self.num_classes), dtype=torch.long, device=self.device)
        group = max(1, self.max_buffered_samples // num)
        parts = [self._count_votes(g, num, batch_size) for g in xs.split(group)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _count_votes(self, xs: Tensor, num: int, batch_size: int) -> Tensor:
        n_inputs, k, dev = xs.shape[0], self.num_classes, self.device
        total = n_inputs * num
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        with self._eval_mode(), torch.inference_mode():
            labels = torch.empty(total, dtype=torch.long, device=dev)
            for i, start in enumerate(range(0, total, batch_size)):
                if self.check is not None and i % 16 == 0:
                    self.check()
                stop = min(start + batch_size, total)
                owner = torch.arange(start, stop, device=dev).div_(num, rounding_mode="floor")
                noisy = torch.empty((stop - start, *xs.shape[1:]), dtype=xs.dtype, device=dev,
                                    memory_format=layout)
                noisy.normal_(0.0, self.sigma, generator=self.generator)
                noisy.add_(xs.index_select(0, owner))
                with self._autocast():
                    logits = self.base_model(noisy)
                if logits.ndim != 2 or logits.shape[1] != k:
                    raise ValueError(f"base model returned logits of shape {tuple(logits.shape)}"
                                     f", expected [batch, {k}]")
                labels[start:stop] = logits.argmax(1)
        keys = torch.arange(total, device=dev).div_(num, rounding_mode="floor").mul_(k)
        keys.add_(labels)
        return torch.bincount(keys, minlength=n_inputs * k).view(n_inputs, k)

    @staticmethod
    def _lower_confidence_bound(k, n, alpha: float):
        """One-sided (1 − α) Clopper–Pearson lower bound on a binomial proportion.

        With probability at least 1 − α over k ~ Bin(n, p), the bound is ≤ p. It is
        Beta.ppf(α; k, n − k + 1) — the p solving P[Bin(n, p) ≥ k] = α — and 0 when k = 0; the
        same as the reference's ``proportion_confint(k, n, alpha=2α, method="beta")[0]``.
        Scalars give a float, arrays an ndarray.
        """
        k_arr, n_arr = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
        if np.any(k_arr < 0) or np.any(k_arr > n_arr):
            raise ValueError("need 0 <= k <= n")
        bound = np.where(k_arr > 0,
                         beta.ppf(alpha, np.maximum(k_arr, 1.0), n_arr - k_arr + 1.0), 0.0)
        return float(bound) if bound.ndim == 0 else bound

    # ------------------------------------------------------------------------------- helpers
    @staticmethod
    def _one(x: Tensor) -> Tensor:
        if x.ndim != 3:
            raise ValueError(f"expected one input [C, H, W], got shape {tuple(x.shape)}")
        return x[None]

    def _autocast(self):
        return autocast(self.device, self.precision)

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        modes = [(m, m.training) for m in self.base_model.modules()]
        self.base_model.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode


def _check_counts(**counts: int) -> None:
    for name, v in counts.items():
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


# ----------------------------------------------------------------------------- a whole test set
@dataclass
class CertifyResult:
    """CERTIFY's rows for a test set, in the order of the requested inputs.

    ``idx`` is the dataset index of each input, ``predict`` the certified class or ABSTAIN,
    ``radius`` 0.0 where abstained, ``correct`` 1 when ``predict == label``, and ``seconds`` the
    wall time of the input's chunk divided by the number of inputs certified in it (inputs are
    certified together, so per-input time is an amortized figure).
    """

    idx: list[int] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    predict: list[int] = field(default_factory=list)
    radius: list[float] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.idx)

    def rows(self) -> Iterator[tuple[int, int, int, float, int, float]]:
        yield from zip(self.idx, self.label, self.predict, self.radius, self.correct,
                       self.seconds, strict=True)


def certify_dataset(smooth: Smooth, x: Tensor, y: Tensor | Sequence[int], *, n0: int, n: int,
                    alpha: float, batch_size: int, chunk: int = 16,
                    store: RowStore | None = None,
                    on_progress: Callable[[dict[str, Any]], None] | None = None,
                    seed: int | None = None,
                    idx: Sequence[int] | None = None,
                    ranks: tuple[int, int, Exchange] | None = None) -> CertifyResult:
    """CERTIFY every input of ``x`` [M, C, H, W] (labels ``y``), ``chunk`` inputs per call.

    Each returned row carries CERTIFY's guarantee for its own input (with probability at least
    1 − α, the class is g(x) and g is constant within the radius); the guarantee is per input,
    not simultaneous over the test set.

    ``store``: where finished rows are kept (a :class:`RowStore`; the job's ``certify.tsv`` is
    ``bulwark.workers.engine.certification.CertifyTSV``): the rows it already holds for the
    settings that change them (σ, n0, n, α, num_classes) are skipped (resume), and each
    chunk's rows are handed to it as they are made. A row for an input that is not this run's,
    or with another label, raises ``ValueError`` instead of mixing rows.

    ``seed``: when given, the noise of each chunk comes from a generator seeded with (seed,
    dataset index of the chunk's first input), so a resumed run draws exactly the noise of an
    uninterrupted one; when ``None``, ``smooth.generator`` or torch's global RNG is used.
    Chunks are the fixed slices [0, chunk), [chunk, 2·chunk), … of the inputs.

    ``idx``: the dataset index of each input (default 0..M−1), e.g. every 20th test image.

    ``ranks``: (rank, world, exchange) when several processes certify together (a
    ``compute.devices`` job): the chunks are dealt round-robin, chunk c to rank c mod world,
    each drawn from its own seeded generator as above, so the rows are those of one process;
    after every round ``exchange(rows)`` returns every rank's rows of the round (a collective:
    every rank calls it the same number of times). Rank 0 alone writes to ``store``; every
    rank reads it to resume.

    ``on_progress`` receives {"done", "total", "samples_per_second", "eta_seconds"} after each
    chunk (``done`` counts resumed rows too); ``eta_seconds`` is None until a first (warm-up)
    chunk has been timed, and the rate leaves that chunk out once there is another.
    """
    _check_counts(n0=n0, n=n, batch_size=batch_size, chunk=chunk)
    _check_alpha(alpha)
    m = x.shape[0]
    labels = [int(v) for v in (y.tolist() if isinstance(y, Tensor) else y)]
    indices = list(range(m)) if idx is None else [int(i) for i in idx]
    if len(labels) != m or len(indices) != m:
        raise ValueError(f"x has {m} inputs but y has {len(labels)} and idx {len(indices)}")
    if len(set(indices)) != m:
        raise ValueError("idx must not repeat")
    label_of = dict(zip(indices, labels, strict=True))

    rank, world, exchange = ranks if ranks is not None else (0, 1, None)
    writer = rank == 0
    done: dict[int, Row] = {}
    if store is not None:
        settings = {"sigma": smooth.sigma, "n0": n0, "n": n, "alpha": alpha,
                    "num_classes": smooth.num_classes}
        for row in store.load(settings, writer=writer):
            if row[0] not in label_of:
                raise ValueError(f"{store} has a row for idx {row[0]}, not an input of this run")
            if row[1] != label_of[row[0]]:
                raise ValueError(f"{store}: idx {row[0]} has label {row[1]}, this run "
                                 f"{label_of[row[0]]}")
            done[row[0]] = row

    per_input = n0 + n
    timed: list[tuple[int, float]] = []  # (samples, seconds) per chunk computed in this run
    saved_generator = smooth.generator
    starts = list(range(0, m, chunk))
    try:
        for first in range(0, len(starts), world):  # a round: one chunk per rank
            rows: list[Row] = []
            lo = starts[first + rank] if first + rank < len(starts) else None
            todo = [] if lo is None else [p for p in range(lo, min(lo + chunk, m))
                                          if indices[p] not in done]
            if todo:
                if seed is not None:
                    smooth.generator = torch.Generator(device=smooth.device).manual_seed(
                        _chunk_seed(seed, indices[lo]))
                t0 = time.perf_counter()
                preds, radii = smooth.certify_batch(x[todo], n0, n, alpha, batch_size)
                elapsed = time.perf_counter() - t0
                timed.append((len(todo) * per_input, elapsed))
                for p, c, r in zip(todo, preds.tolist(), radii.tolist(), strict=True):
                    i = indices[p]
                    rows.append((i, label_of[i], c, r, int(c == label_of[i]),
                                 elapsed / len(todo)))
            if exchange is not None:
                rows = exchange(rows)
            if not rows:
                continue
            done.update((row[0], row) for row in rows)
            if store is not None and writer:
                store.append(rows)
            if on_progress is not None:
                on_progress(_progress(timed, len(done), m, per_input))
    finally:
        smooth.generator = saved_generator

    result = CertifyResult()
    for i in indices:
        for name, v in zip(ROW_FIELDS, done[i], strict=True):
            getattr(result, name).append(v)
    return result


def _chunk_seed(seed: int, first_idx: int) -> int:
    return (seed * 1_000_003 + first_idx * 7_919 + 17) % (2**63 - 1)


def _progress(timed: list[tuple[int, float]], done: int, total: int,
              per_input: int) -> dict[str, Any]:
    steady = timed[1:] if len(timed) > 1 else timed  # leave the warm-up chunk out
    samples, seconds = sum(s for s, _ in steady), sum(t for _, t in steady)
    rate = samples / seconds if seconds > 0 else float("inf")
    eta = None if len(timed) < 2 else (total - done) * per_input / rate
    return {"done": done, "total": total, "samples_per_second": rate, "eta_seconds": eta}


# --------------------------------------------------------------------------------- metrics
def summarize(result: CertifyResult,
              radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)) -> dict[str, Any]:
    """Certified accuracy at each radius, ACR and abstain rate, as in the reference's
    ``analyze.py`` and MACER.

    ``certified_accuracy[r]`` is the fraction of points that are correct *and* have radius ≥ r
    (abstentions count as wrong); ``acr`` is the mean of radius·1[correct]; ``abstain_rate`` the
    fraction of ABSTAIN answers.
    """
    if len(result) == 0:
        raise ValueError("summarize needs at least one certified point")
    predict = np.asarray(result.predict)
    radius = np.asarray(result.radius, dtype=np.float64)
    correct = (np.asarray(result.correct) != 0) & (predict != ABSTAIN)
    return {
        "certified_accuracy": {float(r): float(np.mean(correct & (radius >= r))) for r in radii},
        "acr": float(np.mean(np.where(correct, radius, 0.0))),
        "abstain_rate": float(np.mean(predict == ABSTAIN)),
        "num_points": int(len(result)),
    }


__all__ = ["ABSTAIN", "CertifyResult", "RowStore", "Smooth", "certify_dataset", "summarize"]
