"""Throughput of randomized-smoothing CERTIFY: Bulwark's batched Smooth vs raw forward vs the
reference loop.

For each model (SmallCNN on 1x28x28, PreActResNet-18 on 3x32x32; 10 classes, random weights:
throughput does not depend on them) and precision (fp32; bf16 with channels_last, skipped with
a note where a quick probe fails), it measures in one run:

  (a) certify  Bulwark's ``Smooth.certify_batch`` over ``--inputs`` inputs at once, n0 + n
               noisy samples each, packed into forward batches of ``--batch``;
               samples/s = inputs·(n0 + n) / wall time (noise, forward, votes, bounds).
  (b) forward  the same model at the same precision, layout and batch size, forward only on a
               fixed batch, for the same number of samples. Goal: (a)/(b) >= 0.9.
  (c) ref      the reference ``code/core.py`` of locuslab/smoothing, reproduced below: fp32,
               one input at a time, ``x.repeat`` noise batches of ``--ref-batch`` (1000),
               ``randn_like``, votes moved to the host and counted with its per-sample Python
               loop over a numpy array. Goal: (a)/(c) >= 2.

Rounds are interleaved (every configuration once per round) and the figures are medians over
rounds. From the measured PreActResNet-18 rate it prints the time to certify 500 CIFAR-10
test images at N = 100 000, n0 = 100 (the paper's protocol: every 20th test image) on this
machine. It prints figures and asserts nothing.

    .venv/bin/python bench/certify_throughput.py                 # both models, fp32 + bf16
    .venv/bin/python bench/certify_throughput.py --models small_cnn --n 256 --inputs 2 \\
        --batch 128 --rounds 1                                  # a quick smoke run

On a small CPU the default run (n = 2000, 4 inputs, 3 rounds) takes tens of minutes, mostly
PreActResNet-18; on CPUs without native bf16 the bf16 rows are slower than fp32.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import beta, norm  # noqa: E402

from bulwark.defenses.precision import autocast  # noqa: E402
from bulwark.defenses.smoothing import Smooth  # noqa: E402
from bulwark.workers.engine.environment import cpu_model  # noqa: E402
from bulwark.workers.engine.models import build_model  # noqa: E402

# model -> (in_channels, image_size, mean, std)
MODELS: dict[str, tuple[int, int, tuple[float, ...], tuple[float, ...]]] = {
    "small_cnn": (1, 28, (0.1307,), (0.3081,)),
    "preact_resnet18": (3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}
NUM_CLASSES = 10
SIGMA, ALPHA = 0.25, 0.001
PROTOCOL = {"images": 500, "n0": 100, "n": 100_000}  # CIFAR-10, --skip 20


# ------------------------------------------------------------------- the reference (core.py)
class ReferenceSmooth:
    """``locuslab/smoothing`` ``code/core.py`` ``Smooth.certify`` as written there (fp32, one
    input, per-sample Python counting); ``proportion_confint(..., method="beta")`` replaced by
    the identical beta quantile so that statsmodels is not needed."""

    def __init__(self, base_classifier, num_classes: int, sigma: float) -> None:
        self.base_classifier, self.num_classes, self.sigma = base_classifier, num_classes, sigma

    def certify(self, x, n0: int, n: int, alpha: float, batch_size: int):
        self.base_classifier.eval()
        counts_selection = self._sample_noise(x, n0, batch_size)
        c_a_hat = counts_selection.argmax().item()
        counts_estimation = self._sample_noise(x, n, batch_size)
        n_a = counts_estimation[c_a_hat].item()
        p_a_bar = beta.ppf(alpha, n_a, n - n_a + 1) if n_a > 0 else 0.0
        if p_a_bar < 0.5:
            return -1, 0.0
        return c_a_hat, self.sigma * norm.ppf(p_a_bar)

    def _sample_noise(self, x, num: int, batch_size: int) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            for _ in range(math.ceil(num / batch_size)):
                this_batch_size = min(batch_size, num)
                num -= this_batch_size
                batch = x.repeat((this_batch_size, 1, 1, 1))
                noise = torch.randn_like(batch) * self.sigma
                predictions = self.base_classifier(batch + noise).argmax(1)
                counts += self._count_arr(predictions.cpu().numpy(), self.num_classes)
            return counts

    @staticmethod
    def _count_arr(arr: np.ndarray, length: int) -> np.ndarray:
        counts = np.zeros(length, dtype=int)
        for idx in arr:
            counts[idx] += 1
        return counts


def reference_run(ref: ReferenceSmooth, xs: torch.Tensor, args) -> None:
    """certify.py's loop: the inputs one after the other."""
    for x in xs:
        ref.certify(x, args.n0, args.n, ALPHA, args.ref_batch)


# ---------------------------------------------------------------------------- measurements
def make_model(arch: str, dev: torch.device, channels_last: bool) -> torch.nn.Module:
    c, size, mean, std = MODELS[arch]
    torch.manual_seed(0)
    model = build_model(arch, num_classes=NUM_CLASSES, in_channels=c, image_size=size,
                        mean=mean, std=std).to(dev).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


class Config:
    """One model x precision: its Smooth, its forward-only loop and their timings."""

    def __init__(self, arch: str, precision: str, dev: torch.device, args) -> None:
        self.arch, self.precision, self.dev, self.args = arch, precision, dev, args
        self.channels_last = precision != "fp32"
        model = make_model(arch, dev, False)
        self.model = copy.deepcopy(model)
        self.smooth = Smooth(self.model, NUM_CLASSES, SIGMA, precision=precision,
                             channels_last=self.channels_last)
        c, size, _, _ = MODELS[arch]
        gen = torch.Generator().manual_seed(1)
        self.xs = torch.rand(args.inputs, c, size, size, generator=gen).to(dev)
        batch = torch.rand(args.batch, c, size, size, generator=gen).to(dev)
        self.batch = (batch.contiguous(memory_format=torch.channels_last)
                      if self.channels_last else batch)
        self.samples = args.inputs * (args.n0 + args.n)
        self.forward_iters = max(1, math.ceil(self.samples / args.batch))
        self.times: dict[str, list[float]] = {"certify": [], "forward": []}

    def certify(self) -> None:
        a = self.args
        self.smooth.certify_batch(self.xs, a.n0, a.n, ALPHA, a.batch)

    def forward(self, iters: int | None = None) -> None:
        with torch.inference_mode(), autocast(self.dev, self.precision):
            for _ in range(self.forward_iters if iters is None else iters):
                self.model(self.batch)

    def warm_up(self) -> None:
        a = self.args
        self.smooth.certify_batch(self.xs[:1], 1, a.batch, ALPHA, a.batch)
        self.forward(2)

    def rates(self) -> dict[str, float]:
        return {
            "certify": self.samples / statistics.median(self.times["certify"]),
            "forward": self.forward_iters * self.args.batch
            / statistics.median(self.times["forward"]),
        }


def precision_supported(arch: str, precision: str, dev: torch.device, batch: int) -> str | None:
    if precision == "fp32":
        return None
    try:
        model = make_model(arch, dev, True)
        c, size, _, _ = MODELS[arch]
        x = torch.rand(min(batch, 8), c, size, size, device=dev)
        with torch.inference_mode(), autocast(dev, precision):
            model(x.contiguous(memory_format=torch.channels_last)).argmax(1)
    except Exception as e:  # report it and carry on with the other precisions
        return f"{type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------------------- output


def header(dev: torch.device, args) -> dict[str, Any]:
    h = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
         "torch": torch.__version__, "python": platform.python_version(),
         "device": str(dev), "threads": torch.get_num_threads(), "cpu": cpu_model(),
         "cores": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
         "sigma": SIGMA, "alpha": ALPHA, "n0": args.n0, "n": args.n, "inputs": args.inputs,
         "batch": args.batch, "ref_batch": args.ref_batch, "rounds": args.rounds}
    if dev.type == "cuda":
        h["gpu"] = torch.cuda.get_device_name(dev)
        h["cuda"] = torch.version.cuda
    return h


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small_cnn,preact_resnet18")
    ap.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16, fp16 "
                    "(bf16/fp16 run with channels_last)")
    ap.add_argument("--n", type=int, default=2000, help="estimation samples per input")
    ap.add_argument("--n0", type=int, default=100, help="selection samples per input")
    ap.add_argument("--inputs", type=int, default=4, help="inputs certified together")
    ap.add_argument("--batch", type=int, default=1000, help="Bulwark's forward batch size")
    ap.add_argument("--ref-batch", type=int, default=1000, help="the reference's noise batch")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    ap.add_argument("--no-reference", action="store_true", help="leave out the reference loop")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    for name in ("models", "precisions"):
        setattr(args, name, [s for s in getattr(args, name).split(",") if s])
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {sorted(MODELS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                       if args.device == "auto" else args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    h = header(dev, args)
    print("# certify throughput: " + ", ".join(f"{k}={v}" for k, v in h.items()))
    if dev.type == "cpu" and h["loadavg_1m"] >= 0.5:
        print(f"note: the 1-minute load average is {h['loadavg_1m']}: figures are noisy")
    t_start = time.perf_counter()

    results: list[dict[str, Any]] = []
    for arch in args.models:
        configs = []
        for precision in args.precisions:
            why = precision_supported(arch, precision, dev, args.batch)
            if why:
                print(f"note: skipped {arch} {precision}: {why}")
                continue
            configs.append(Config(arch, precision, dev, args))
        if not configs:
            continue
        ref_run = None
        ref_times: list[float] = []
        if not args.no_reference:
            ref = ReferenceSmooth(make_model(arch, dev, False), NUM_CLASSES, SIGMA)
            ref_run = functools.partial(reference_run, ref, configs[0].xs, args)
            ref.certify(configs[0].xs[0], 1, args.ref_batch, ALPHA, args.ref_batch)  # warm-up
        for cfg in configs:
            cfg.warm_up()
        for r in range(args.rounds):
            for cfg in configs if r % 2 == 0 else configs[::-1]:
                cfg.times["certify"].append(timed(cfg.certify, sync))
                cfg.times["forward"].append(timed(cfg.forward, sync))
            if ref_run is not None:
                ref_times.append(timed(ref_run, sync))
            print(f"  [{arch}] round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        ref_rate = (args.inputs * (args.n0 + args.n) / statistics.median(ref_times)
                    if ref_times else None)
        for cfg in configs:
            rates = cfg.rates()
            results.append({
                "model": arch, "precision": cfg.precision, "channels_last": cfg.channels_last,
                "certify_sps": rates["certify"], "forward_sps": rates["forward"],
                "reference_sps": ref_rate,
                "certify_over_forward": rates["certify"] / rates["forward"],
                "certify_over_reference": rates["certify"] / ref_rate if ref_rate else None,
            })

    print(f"\nsamples/s (median of {args.rounds} rounds; n0={args.n0}, n={args.n}, "
          f"{args.inputs} inputs, batch {args.batch}; reference: fp32, batch {args.ref_batch})")
    cols = f"{'model':<16} {'prec':<5} {'certify':>10} {'forward':>10} {'reference':>10} " \
           f"{'cert/fwd':>9} {'cert/ref':>9}"
    print(cols)
    print("-" * len(cols))
    for row in results:
        ref_s = f"{row['reference_sps']:10.0f}" if row["reference_sps"] else f"{'-':>10}"
        ratio = (f"{row['certify_over_reference']:8.2f}x" if row["certify_over_reference"]
                 else f"{'-':>9}")
        print(f"{row['model']:<16} {row['precision']:<5} {row['certify_sps']:10.0f} "
              f"{row['forward_sps']:10.0f} {ref_s} {row['certify_over_forward']:9.3f} {ratio}")
    print("goals: cert/fwd >= 0.9, cert/ref >= 2")

    per_set = PROTOCOL["images"] * (PROTOCOL["n0"] + PROTOCOL["n"])
    estimates = []
    for row in results:
        if row["model"] != "preact_resnet18":
            continue
        est = {"precision": row["precision"], "seconds": per_set / row["certify_sps"]}
        if row["reference_sps"]:
            est["reference_seconds"] = per_set / row["reference_sps"]
        estimates.append(est)
    if estimates:
        print(f"\nestimated time to certify {PROTOCOL['images']} CIFAR-10 images at "
              f"N={PROTOCOL['n']}, n0={PROTOCOL['n0']} with PreActResNet-18 on this machine:")
        for est in estimates:
            ref_s = (f" (reference loop: {fmt_duration(est['reference_seconds'])})"
                     if "reference_seconds" in est else "")
            print(f"  {est['precision']:<5} {fmt_duration(est['seconds'])}{ref_s}")

    h["wall_s"] = round(time.perf_counter() - t_start, 1)
    h["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    print(f"\nwall {h['wall_s']} s; 1-minute load average at the end {h['loadavg_1m_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": h, "rows": results,
                                         "estimate_500_cifar10": estimates}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
