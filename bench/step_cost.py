"""Cost of one training step per recipe: median step time, images/s and ratios.

For each model x precision x recipe this builds the model, SGD (momentum 0.9, wd 5e-4,
lr 0.01) and ``Recipe`` at ε = 8/255 (ℓ∞) on a fixed random batch, and times full training
steps exactly as ``bulwark.workers.engine.runner.run_job`` does them (set lr, autocast,
``recipe.step``, zero_grad, backward, ``optimizer.step()`` x ``optimizer_steps``, ``after_step``,
per-step metric accumulation). Measurements are interleaved: every round times every recipe for a
few steps (the order rotates each round), and the figures are per-recipe medians over all
rounds. It prints figures and never asserts anything about them.

Next to the measured ELLE/FGSM ratio it prints the FLOP-bound expectation built from
measured parts (F = forward over B images, b_in = input-only backward, b_full = backward over
the weights):

    FGSM step  ≈ F (attack) + b_in + F (training) + b_full
    ELLE step  ≈ FGSM + 3·(F + b_full)          (the 3B triplet forward and its backward)
    AAER step  ≈ its base attack's step          (no extra pass: expected ratio 1.0)

and a naive eager ELLE (the paper's step as a user would write it: FGSM through
``loss.backward()`` on a requires_grad input, which also computes weight gradients, then three
separate forwards for x_a, x_b, x_c) timed in the same rounds, so Bulwark's ELLE/FGSM ratio
can be set against the naive ELLE/naive FGSM ratio.

    python bench/step_cost.py                       # every model, precision and recipe
    python bench/step_cost.py --models small_cnn --recipes standard,fgsm,fgsm-elle --iters 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bulwark.contract.presets import PRESETS  # noqa: E402
from bulwark.contract.spec import JobSpec  # noqa: E402
from bulwark.defenses import Recipe  # noqa: E402
from bulwark.defenses.precision import autocast as _autocast  # noqa: E402
from bulwark.workers.engine.environment import cpu_model  # noqa: E402
from bulwark.workers.engine.models import build_model  # noqa: E402
from bulwark.workers.engine.runner import EpochStats, channels_last_on, train_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_steps import reference_step  # noqa: E402

ALL_RECIPES = ("standard", "fgsm", "fgsm-rs", "n-fgsm", "fgsm-elle", "fgsm-elle-a",
               "n-fgsm-elle-a", "rs-aaer", "n-aaer", "fgsm-gradalign", "pgd-at", "trades",
               "pgd-awp", "pgd-adr", "pgd-adr-awp", "trades-awp", "trades-adr")
EPSILON = "8/255"
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
SEED = 0
REF = "ref:"  # the official-style step of a recipe (bench/reference_steps.py)
NAIVE_FGSM, NAIVE_ELLE = REF + "fgsm", REF + "fgsm-elle"
PROBE = "(probe)"
COMPILED = "+compile"  # the same recipe's step through torch.compile (compute.compile: on)
# model -> (in_channels, image_size, mean, std); 10 classes for both.
MODELS: dict[str, tuple[int, int, tuple[float, ...], tuple[float, ...]]] = {
    "small_cnn": (1, 28, (0.1307,), (0.3081,)),
    "preact_resnet18": (3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}
NUM_CLASSES = 10


# ----------------------------------------------------------------------------- the step
def bulwark_step(model, optimizer, scaler, recipe, x, y, *, lr: float, precision: str,
                 channels_last: bool, acc: EpochStats) -> None:
    """The runner's own step (``bulwark.workers.engine.runner.train_step``) plus its per-epoch
    bookkeeping."""
    acc.add(train_step(model, optimizer, scaler, recipe, x, y, lr=lr, precision=precision,
                       channels_last=channels_last), y)


# ----------------------------------------------------------------------------- subjects
@dataclass
class Subject:
    name: str
    step: Callable[[], Any]
    times: list[float] = field(default_factory=list)
    acc: EpochStats | dict[str, Any] | None = None
    base: str | None = None          # the row this one is compared with ("x base")
    optimizer_steps: int = 1
    first_s: float | None = None     # the first step's time (torch.compile's compilation)


def new_acc(dev: torch.device) -> dict[str, Any]:
    return {"seen": 0, "loss_sum": torch.zeros((), device=dev),
            "correct": torch.zeros((), dtype=torch.long, device=dev), "sums": {}}


def base_recipe(name: str) -> str | None:
    """The recipe an ELLE / GradAlign / AAER preset adds its regularizer to, or the PGD-AT /
    TRADES recipe an AWP / ADR preset adds its part to."""
    spec = recipe_spec(name)
    if spec.weight_perturbation is not None or spec.labels.kind == "adr":
        return "trades" if spec.loss.kind == "trades" else "pgd-at"
    if not spec.regularizers:
        return None
    return {"fgsm": "fgsm", "fgsm_rs": "fgsm-rs", "n_fgsm": "n-fgsm"}.get(spec.adversary.kind)


def parts_bound(spec, f: float, b_in: float, b_full: float) -> float:
    """The FLOP-bound ratio to the base recipe. PGD-k AT = k·(F + b_in) + F + b_full; TRADES =
    F (p(x) for the attack) + k·(F + b_in) + 2F + 2·b_full. AWP adds the proxy's training pass
    (F + b_full, or 2F + 2·b_full for TRADES); ADR adds one no-grad teacher forward F."""
    k = spec.adversary.steps
    trades = spec.loss.kind == "trades"
    train = 2 * (f + b_full) if trades else f + b_full
    base = k * (f + b_in) + train + (f if trades else 0.0)
    extra = 0.0
    if spec.weight_perturbation is not None:
        extra += train
    if spec.labels.kind == "adr":
        extra += f
    return (base + extra) / base


def recipe_spec(name: str):
    return JobSpec.model_validate({"recipe": name, "threat": {"epsilon": EPSILON}}).recipe


def reg_kinds(name: str) -> set[str]:
    if name not in PRESETS:
        return set()
    return {r.kind for r in recipe_spec(name).regularizers}


def make_model(arch: str, init: dict, dev: torch.device, channels_last: bool):
    cin, size, mean, std = MODELS[arch]
    model = build_model(arch, num_classes=NUM_CLASSES, in_channels=cin, image_size=size,
                        mean=mean, std=std)
    model.load_state_dict(init)
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    return model


def make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                           weight_decay=WEIGHT_DECAY)


def build_subjects(arch, init, recipes, x, y, dev, precision, channels_last, reference,
                   compiled=False):
    subjects: list[Subject] = []
    for name, compile_ in [(n, False) for n in recipes] + [(n, True) for n in recipes
                                                             if compiled]:
        spec = JobSpec.model_validate({"recipe": name, "threat": {"epsilon": EPSILON}})
        model = make_model(arch, init, dev, channels_last)
        opt = make_optimizer(model)
        scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
        recipe = Recipe(spec.recipe, eps=spec.threat.epsilon, norm=spec.threat.norm)
        recipe.bind(model, total_steps=10_000)  # EMA copies (ADR teacher, WA) as the runner
        recipe.begin_epoch(10_000)  # past any warm-up (TRADES-AWP starts at epoch 10)
        acc = EpochStats(dev)
        # as the runner with compute.compile on: the step's network compiled, the rest eager
        net = torch.compile(model) if compile_ else model
        step = functools.partial(bulwark_step, net, opt, scaler, recipe, x, y, lr=LR,
                                 precision=precision, channels_last=channels_last, acc=acc)
        subjects.append(Subject(name + COMPILED if compile_ else name, step, acc=acc,
                                base=name if compile_ else base_recipe(name),
                                optimizer_steps=recipe.optimizer_steps))
    if reference:  # the yardstick: each recipe as its official code writes the step
        for name in recipes:
            spec = JobSpec.model_validate({"recipe": name, "threat": {"epsilon": EPSILON}})
            model = make_model(arch, init, dev, channels_last=False)  # plain fp32 eager
            opt = make_optimizer(model)
            acc = new_acc(dev)
            ref = reference_step(spec, model, opt)

            def step(ref=ref, acc=acc):
                acc["loss_sum"] += ref(x, y) * y.shape[0]

            base = base_recipe(name)
            subjects.append(Subject(REF + name, step, acc=acc,
                                    base=REF + base if base else None))
    return subjects


class Probe:
    """Times F, b_in, b_full (and b_both, the naive attack's backward) at batch B."""

    def __init__(self, arch, init, x, y, dev, precision, channels_last, sync):
        self.model = make_model(arch, init, dev, channels_last)
        self.x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        self.y, self.dev, self.precision, self.sync = y, dev, precision, sync
        self.times: dict[str, list[float]] = {"F": [], "b_in": [], "b_full": [], "b_both": []}

    def _forward(self, x):
        with _autocast(self.dev, self.precision):
            return F.cross_entropy(self.model(x).float(), self.y, reduction="none")

    def _clock(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def run(self, record: bool = True) -> None:
        m, x = self.model, self.x
        t_f = self._clock(lambda: self._forward(x))            # graph is built, as in training
        xr = x.detach().requires_grad_(True)
        loss = self._forward(xr).sum()
        t_in = self._clock(lambda: torch.autograd.grad(loss, xr))
        loss = self._forward(x).mean()
        t_full = self._clock(loss.backward)
        m.zero_grad(set_to_none=True)
        xr = x.detach().requires_grad_(True)
        loss = self._forward(xr).mean()
        t_both = self._clock(loss.backward)
        m.zero_grad(set_to_none=True)
        if record:
            for k, v in zip(self.times, (t_f, t_in, t_full, t_both), strict=True):
                self.times[k].append(v)

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.times.items() if v}


# ----------------------------------------------------------------------------- measuring
def timed(step: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t0


def precision_supported(arch, init, x, y, dev, precision, channels_last) -> str | None:
    """None if a forward/backward under this precision works, else the reason."""
    if precision == "fp32":
        return None
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "torch.cuda.is_bf16_supported() is False"
    try:
        model = make_model(arch, init, dev, channels_last)
        xs = x[:2].contiguous(memory_format=torch.channels_last) if channels_last else x[:2]
        with _autocast(dev, precision):
            loss = F.cross_entropy(model(xs), y[:2])
        loss.backward()
        if not torch.isfinite(loss).item():
            return "non-finite loss in the probe"
    except Exception as e:  # any failure means: skip this precision
        return f"{type(e).__name__}: {e}"
    return None


def bench_config(arch: str, precision: str, batch: int, recipes: list[str], args,
                 dev: torch.device, layout: str = "auto",
                 ) -> tuple[list[dict], dict | None, list[str]]:
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    channels_last = channels_last_on({"cl": "on", "nchw": "off"}.get(layout, "auto"), dev)
    cin, size, _, _ = MODELS[arch]
    gen = torch.Generator().manual_seed(SEED)
    x = torch.rand(batch, cin, size, size, generator=gen).to(dev)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(dev)
    torch.manual_seed(SEED)
    cin, size, mean, std = MODELS[arch]
    init = build_model(arch, num_classes=NUM_CLASSES, in_channels=cin, image_size=size,
                       mean=mean, std=std).state_dict()

    why = precision_supported(arch, init, x, y, dev, precision, channels_last)
    if why is not None:
        return [], None, [f"skipped {arch} {precision}: {why}"]

    reference = args.reference
    torch.manual_seed(SEED)
    subjects = build_subjects(arch, init, recipes, x, y, dev, precision, channels_last,
                              reference, compiled=args.compile)
    probe = Probe(arch, init, x, y, dev, precision, channels_last, sync)

    # warm-up: every subject, round robin; a recipe whose step fails is dropped with a note
    failed = []
    for i in range(max(1, args.warmup)):
        for s in list(subjects):
            try:
                t = timed(s.step, sync)
                if s.first_s is None:
                    s.first_s = t
            except Exception as e:  # report it and carry on with the other recipes
                if i:
                    raise
                failed.append(f"skipped {arch} {precision} {s.name}: {type(e).__name__}: {e}")
                subjects.remove(s)
        probe.run(record=False)
    sync()
    for n in failed:
        print(f"note: {n}")

    k = max(1, args.round_iters)
    rounds = math.ceil(args.iters / k)
    done = 0
    for r in range(rounds):
        n = min(k, args.iters - done)
        done += n
        gc.collect()
        order = subjects[r % len(subjects):] + subjects[:r % len(subjects)]
        for s in order:
            for _ in range(n):
                s.times.append(timed(s.step, sync))
        for _ in range(n):
            probe.run()
        if args.progress:
            print(f"  [{arch} {precision}] round {r + 1}/{rounds}", file=sys.stderr, flush=True)

    med = {s.name: statistics.median(s.times) for s in subjects}
    parts = probe.medians()
    f, b_in, b_full, b_both = parts["F"], parts["b_in"], parts["b_full"], parts["b_both"]
    fgsm_model = 2 * f + b_in + b_full
    elle_model = fgsm_model + 3 * (f + b_full)
    naive_fgsm_model = 2 * f + b_both + b_full
    naive_elle_model = naive_fgsm_model + 3 * (f + b_full)
    expected = {
        "elle": elle_model / fgsm_model,
        "naive_elle": naive_elle_model / naive_fgsm_model,
        "fgsm_vs_standard": fgsm_model / (f + b_full),
    }

    rows = []
    for s in subjects:
        loss_sum = s.acc.loss_sum if isinstance(s.acc, EpochStats) else s.acc["loss_sum"]
        nonfinite = not bool(torch.isfinite(loss_sum).item())
        kinds = reg_kinds(s.name)
        exp = None
        if kinds & {"elle", "elle_a"}:
            exp = expected["elle"]
        elif "aaer" in kinds:
            exp = 1.0
        elif s.name == NAIVE_ELLE:
            exp = expected["naive_elle"]
        elif s.name in PRESETS and s.base in ("pgd-at", "trades"):
            exp = parts_bound(recipe_spec(s.name), f, b_in, b_full)
        base_t = med.get(s.base) if s.base else None
        std_t = med.get("standard")
        m = med[s.name]
        ref_t = med.get(REF + s.name)
        rows.append({
            "model": arch, "precision": precision,
            # the reference rows are the official code's: contiguous fp32 whatever the config
            "layout": "channels_last" if channels_last and not s.name.startswith(REF)
            else "contiguous", "batch": batch,
            "recipe": s.name, "median_s": m, "min_s": min(s.times),
            "p90_s": sorted(s.times)[max(0, math.ceil(0.9 * len(s.times)) - 1)],
            "n": len(s.times), "images_per_s": batch / m,
            "x_standard": m / std_t if std_t else None,
            "base": s.base, "x_base": m / base_t if base_t else None,
            "x_base_expected": exp,
            "speedup_vs_reference": ref_t / m if ref_t else None,
            "first_step_s": s.first_s,
            "optimizer_steps": s.optimizer_steps,
            "nonfinite_loss": nonfinite,
        })
    probe_row = {"model": arch, "precision": precision, "batch": batch,
                 "F_s": f, "b_in_s": b_in, "b_full_s": b_full, "b_both_s": b_both,
                 "fgsm_model_s": fgsm_model, "elle_model_s": elle_model,
                 "naive_fgsm_model_s": naive_fgsm_model, "naive_elle_model_s": naive_elle_model,
                 "expected_elle_over_fgsm": expected["elle"],
                 "expected_naive_elle_over_naive_fgsm": expected["naive_elle"],
                 "expected_fgsm_over_standard": expected["fgsm_vs_standard"],
                 "measured_fgsm_s": med.get("fgsm"),
                 "measured_fgsm_elle_s": med.get("fgsm-elle", med.get("fgsm-elle-a")),
                 "measured_naive_fgsm_s": med.get(NAIVE_FGSM),
                 "measured_naive_elle_s": med.get(NAIVE_ELLE)}
    del subjects, probe
    gc.collect()
    return rows, probe_row, failed


# ----------------------------------------------------------------------------- output


def header(dev: torch.device) -> dict[str, Any]:
    h = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
         "torch": torch.__version__, "python": platform.python_version(),
         "device": str(dev), "threads": torch.get_num_threads(), "cpu": cpu_model(),
         "cores": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
         "epsilon": EPSILON, "norm": "linf", "optimizer": f"SGD lr={LR} momentum={MOMENTUM} "
         f"wd={WEIGHT_DECAY}"}
    if dev.type == "cuda":
        h["gpu"] = torch.cuda.get_device_name(dev)
        h["cuda"] = torch.version.cuda
    return h


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    cols = [("model", "model", "s"), ("prec", "precision", "s"), ("mem", "mem", "s"),
            ("B", "batch", "d"),
            ("recipe", "recipe", "s"), ("median ms", "median_s", "ms"),
            ("min ms", "min_s", "ms"), ("p90 ms", "p90_s", "ms"), ("img/s", "images_per_s", ".0f"),
            ("x std", "x_standard", ".2f"), ("base", "base", "s"), ("x base", "x_base", ".2f"),
            ("expect", "x_base_expected", ".2f"), ("vs ref", "speedup_vs_reference", ".2f"),
            ("1st s", "first_step_s", ".1f"), ("n", "n", "d")]
    cells = []
    for r in rows:
        r = dict(r, mem="CL" if r["layout"] == "channels_last" else "NCHW")
        line = []
        for _, key, spec in cols:
            v = r.get(key)
            if spec == "ms":
                line.append(_fmt(None if v is None else v * 1e3, ".1f"))
            elif spec == "s":
                line.append("-" if v is None else str(v))
            else:
                line.append(_fmt(v, spec))
        if r.get("nonfinite_loss"):
            line[4] += " (!nan)"
        cells.append(line)
    widths = [max(len(c[0]), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
    left = {0, 1, 2, 4, 10}
    def render(vals):
        return "  ".join(v.ljust(w) if i in left else v.rjust(w)
                         for i, (v, w) in enumerate(zip(vals, widths, strict=True)))
    print(render([c[0] for c in cols]))
    print("  ".join("-" * w for w in widths))
    prev = None
    for r, line in zip(rows, cells, strict=True):
        key = (r["model"], r["precision"])
        if prev is not None and key != prev:
            print()
        prev = key
        print(render(line))


def print_probe(p: dict) -> None:
    ms = 1e3
    print(f"{p['model']} {p['precision']} B={p['batch']}:  F={p['F_s'] * ms:.1f} ms  "
          f"b_in={p['b_in_s'] * ms:.1f} ms  b_full={p['b_full_s'] * ms:.1f} ms  "
          f"b_both={p['b_both_s'] * ms:.1f} ms")
    def meas(a, b):
        ta, tb = p.get(a), p.get(b)
        return f"{ta / tb:.2f}" if ta and tb else "-"
    def t(key):
        return _fmt(p[key] * ms if p.get(key) else None, ".1f")
    print(f"    FGSM ≈ 2F + b_in + b_full = {p['fgsm_model_s'] * ms:.1f} ms "
          f"(measured {t('measured_fgsm_s')} ms);  ELLE ≈ FGSM + 3(F + b_full) = "
          f"{p['elle_model_s'] * ms:.1f} ms (measured, fgsm-elle or else fgsm-elle-a: "
          f"{t('measured_fgsm_elle_s')} ms)")
    print(f"    ELLE/FGSM   Bulwark: expected {p['expected_elle_over_fgsm']:.2f}, measured "
          f"{meas('measured_fgsm_elle_s', 'measured_fgsm_s')}   |   naive: expected "
          f"{p['expected_naive_elle_over_naive_fgsm']:.2f} (attack backward = b_both), measured "
          f"{meas('measured_naive_elle_s', 'measured_naive_fgsm_s')}")
    print("    naive FGSM / Bulwark FGSM: measured "
          f"{meas('measured_naive_fgsm_s', 'measured_fgsm_s')};  AAER/base expected 1.00")


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small_cnn,preact_resnet18",
                    help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--recipes", default=",".join(ALL_RECIPES),
                    help="comma list of presets; 'standard' and the base recipe of every "
                    "regularized preset are added for the ratio columns")
    ap.add_argument("--batch-small", type=int, default=128, help="SmallCNN batch (1x28x28)")
    ap.add_argument("--batch-prn", type=int, default=None,
                    help="PreActResNet-18 batch (3x32x32); default 32 on CPU, 128 on CUDA")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed steps per recipe (at least 1 is always run)")
    ap.add_argument("--iters", type=int, default=10, help="timed steps per recipe")
    ap.add_argument("--round-iters", type=int, default=2,
                    help="steps per recipe in one interleaving round")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of: fp32, bf16")
    ap.add_argument("--layouts", default="auto",
                    help="comma list of: auto (the runner's compute.channels_last: auto), "
                         "nchw (contiguous), cl (channels_last)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    ap.add_argument("--json", default=None, metavar="OUT.json", help="also write the rows here")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="leave out the reference rows (each recipe as its official code "
                         "writes the step: bench/reference_steps.py) and the speed-up column")
    ap.add_argument("--compile", action="store_true",
                    help="add a '<recipe>+compile' row per recipe: its step with the network "
                    "through torch.compile (compute.compile: on); 'x base' is then its ratio "
                    "to the eager row and '1st s' the first step, compilation included")
    ap.add_argument("--progress", action="store_true", help="print each round to stderr")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                       else "cpu" if args.device == "auto" else args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    layouts = [t.strip() for t in args.layouts.split(",") if t.strip()]
    for t in layouts:
        if t not in ("auto", "nchw", "cl"):
            print(f"unknown layout {t!r}; choose auto, nchw or cl", file=sys.stderr)
            return 2
    wanted = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for m in models:
        if m not in MODELS:
            print(f"unknown model {m!r}; choose from {', '.join(MODELS)}", file=sys.stderr)
            return 2
    for p in precisions:
        if p not in ("fp32", "bf16"):
            print(f"unknown precision {p!r}; choose fp32 or bf16", file=sys.stderr)
            return 2
    for r in wanted:
        if r not in PRESETS:
            print(f"unknown recipe {r!r}; choose from {', '.join(PRESETS)}", file=sys.stderr)
            return 2
    recipes = list(dict.fromkeys(["standard", *wanted]))
    added = [b for r in wanted if (b := base_recipe(r)) and b not in recipes]
    recipes = list(dict.fromkeys(recipes + added))
    recipes.sort(key=lambda r: list(PRESETS).index(r))
    notes = []
    if "standard" not in wanted:
        notes.append("added 'standard' (the x std column)")
    if added:
        notes.append(f"added base recipes for the x base column: {', '.join(dict.fromkeys(added))}")

    h = header(dev)
    print("Bulwark step cost  " + "  ".join(f"{k}={v}" for k, v in h.items()))
    print(f"warmup={args.warmup} iters={args.iters} round_iters={args.round_iters} "
          f"(medians over interleaved rounds; times per full training step)")
    if dev.type == "cpu" and h["loadavg_1m"] >= 0.5:
        notes.append(f"the 1-minute load average is {h['loadavg_1m']} before the bench starts: "
                     "other processes compete for the CPU and the figures will be noisy (use an "
                     "idle machine, or --threads below the free cores)")
    for n in notes:
        print(f"note: {n}")
    print()
    t_start = time.perf_counter()

    all_rows, probes = [], []
    for arch in models:
        batch = args.batch_small if arch == "small_cnn" else (
            args.batch_prn or (128 if dev.type == "cuda" else 32))
        for precision in precisions:
            for layout in layouts:
                rows, probe, skipped = bench_config(arch, precision, batch, recipes, args, dev,
                                                    layout)
                notes += skipped
                if probe is None:
                    print(f"note: {skipped[0]}")
                    continue
                all_rows += rows
                probes.append(probe)
    print()
    if all_rows:
        print_table(all_rows)
        print()
        print("mem: CL = channels_last model and inputs, NCHW = contiguous.  "
              "x std: / standard step (same model, precision, batch).  base / x base: the "
              "recipe's base attack (ELLE, GradAlign: fgsm or n-fgsm; AAER: fgsm-rs or n-fgsm; "
              "naive-fgsm-elle: naive-fgsm).  expect: FLOP-bound x base from measured parts "
              "(ELLE), 1.00 (AAER).  <recipe>+compile (--compile): the step through "
              "torch.compile, its x base against the eager row; 1st s: the first step "
              "(compilation).")
        if any(r["nonfinite_loss"] for r in all_rows):
            print("(!nan): the loss went non-finite during the run; its timing may be off.")
        print()
        print("FLOP-bound parts (medians; F = forward over B images with graph, b_in = input-only "
              "backward, b_full = weight backward, b_both = backward to weights and input):")
        for p in probes:
            print_probe(p)
    h["wall_s"] = round(time.perf_counter() - t_start, 1)
    h["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    print(f"\nwall {h['wall_s']} s; 1-minute load average at the end {h['loadavg_1m_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"header": h, "args": vars(args), "notes": notes, "rows": all_rows,
             "flop_model": probes}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
