"""The job runner: data → model → recipe → epochs (train, monitor, checkpoint) → final report.

One call, ``run_job(spec, out_dir)``, used by ``bulwark run`` and by the Celery task. The whole
training set lives on the device as one uint8 tensor; batches are augmented there. Every epoch
starts from RNG states derived from (seed, epoch), and a checkpoint is written atomically at the
end of every epoch, so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from defenses import Recipe, StepOutput
from workers.checkpoint import (
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    write_json,
)
from workers.data import DeviceLoader, load_dataset, split_validation
from workers.models import build_model
from workers.monitor import COWatchdog, monitor
from workers.report import REPORT_VERSION, environment, final_evaluation
from workers.schedule import lr_at
from workers.spec import JobSpec

CHECKPOINT = "checkpoint.pt"
BEST = "best.safetensors"  # weights of the best monitor-PGD epoch, kept apart from the last
WA = "wa.safetensors"      # the weight-averaged model, when the recipe keeps one
CERTIFY_TSV = "certify.tsv"  # per-point certification results (Cohen's columns)
Event = Callable[[str, dict[str, Any]], None]


class Cancelled(Exception):
    """Raised inside the loop when ``should_stop`` says so; the last checkpoint stands."""


@dataclass
class Timing:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(device)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, recipe: Recipe, x: torch.Tensor, y: torch.Tensor,
               *, lr: float, precision: str, channels_last: bool) -> StepOutput:
    """One optimizer step of ``recipe`` on (x, y) at learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, precision):
        out = recipe.step(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    recipe.before_optimizer_step(model)
    for _ in range(recipe.optimizer_steps):
        scaler.step(optimizer)
    scaler.update()
    recipe.after_step(model)
    return out


class EpochStats:
    """Per-epoch sums kept on the device; one host synchronization in ``summary``."""

    def __init__(self, device: torch.device):
        self.seen, self.steps = 0, 0
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, out: StepOutput, y: torch.Tensor) -> None:
        b = y.shape[0]
        self.seen += b
        self.steps += 1
        self.loss_sum += out.loss.detach() * b
        self.correct += (out.logits.detach().argmax(1) == y).sum()
        for k, v in out.metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()

    def summary(self) -> dict[str, Any]:
        keys = sorted(self.sums)
        packed = torch.stack([self.loss_sum.float(), self.correct.float()]
                             + [self.sums[k].float() for k in keys]).tolist()
        n, steps = max(self.seen, 1), max(self.steps, 1)
        return {"train_loss": packed[0] / n, "train_acc": packed[1] / n,
                "metrics": {k: v / steps for k, v in zip(keys, packed[2:], strict=True)}}


def run_job(spec: JobSpec, out_dir: str | Path, *, device: str | None = "cpu",
            resume: bool = False, progress: bool = True, on_event: Event | None = None,
            should_stop: Callable[[], bool] | None = None,
            weights: str | Path | None = None) -> dict[str, Any]:
    """Train and evaluate ``spec``; write ``report.json`` and ``model.safetensors`` to out_dir.

    ``weights``: the resolved file of ``spec.model.weights`` (the service resolves uploaded
    model ids; ``bulwark run`` takes the spec's path as it is). With ``mode: evaluate`` no
    training happens: the weights are evaluated (and certified) as they are.

    Raises ``Cancelled`` if ``should_stop()`` turns true (checked between steps); the
    checkpoint of the last finished epoch remains and ``resume=True`` continues from it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    emit = on_event or (lambda kind, data: None)
    timing = Timing()
    t_start = time.perf_counter()
    sched, ev = spec.schedule, spec.evaluation
    eps, norm = spec.threat.epsilon, spec.threat.norm

    with timing.phase("data"):
        data = load_dataset(spec.dataset)
        train_x, train_y, val_x, val_y = split_validation(
            data.train_x, data.train_y, spec.dataset.val_size, sched.seed)
        loader = DeviceLoader(train_x, train_y, sched.batch_size, device=dev,
                              crop_padding=data.crop_padding, flip=data.flip, shuffle=True)
        n_mon = min(ev.monitor.size, val_x.shape[0])
        mon_x = val_x[:n_mon].to(dev).float().div_(255)
        mon_y = val_y[:n_mon].to(dev)

    torch.manual_seed(sched.seed)
    model = build_model(spec.model.arch, num_classes=data.num_classes,
                        in_channels=data.train_x.shape[1], image_size=data.train_x.shape[2],
                        mean=data.mean, std=data.std, depth=spec.model.depth,
                        widen_factor=spec.model.widen_factor).to(dev)
    channels_last = spec.compute.channels_last == "on" or (
        spec.compute.channels_last == "auto" and dev.type == "cuda")
    weights = weights or spec.model.weights
    if weights:
        try:
            load_weights(Path(weights), model, device=dev)
        except (OSError, RuntimeError, SafetensorError) as e:
            raise ValueError(f"model.weights {weights}: cannot load into a {spec.model.arch} "
                             f"for this dataset: {e}") from e
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=sched.momentum,
                                weight_decay=sched.weight_decay, nesterov=sched.nesterov)
    scaler = torch.amp.GradScaler(dev.type, enabled=spec.compute.precision == "fp16")
    steps_per_epoch = len(loader)
    recipe = Recipe(spec.recipe, eps=eps, norm=norm)
    recipe.bind(model, steps_per_epoch * sched.epochs)
    watchdog = COWatchdog(ev.monitor.co_drop, ev.monitor.co_gap)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None  # the epoch with the best monitor PGD accuracy
    start_epoch = 0
    meta = {"arch": spec.model.arch, "num_classes": str(data.num_classes),
            "in_channels": str(data.train_x.shape[1]),
            "image_size": str(data.train_x.shape[2]), "format": "bulwark-v1"}

    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=dev)
        if state.get("spec") != spec.model_dump_json():
            raise ValueError(f"{ckpt_path} was written for a different job spec; resume with "
                             "the same spec, or start over in another folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        recipe.load_state_dict(state["recipe"])
        watchdog.load_state_dict(state["watchdog"])
        history = list(state["history"])
        best = state["best"]
        start_epoch = int(state["epoch"])
        for k, v in state["timing"].items():
            timing.seconds[k] = float(v)
        emit("resumed", {"epoch": start_epoch})

    total_steps = steps_per_epoch * sched.epochs
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, unit="step",
                   dynamic_ncols=True, desc=spec.name or (spec.recipe.preset or "job"))
    emit("started", {"epochs": sched.epochs, "start_epoch": start_epoch, "device": str(dev)})

    last_epoch = sched.epochs if spec.mode == "train" else 0
    try:
        for epoch in range(start_epoch, last_epoch):
            torch.manual_seed(epoch_seed(sched.seed, epoch))
            gen = torch.Generator(device="cpu").manual_seed(epoch_seed(sched.seed, epoch) + 1)
            model.train()
            recipe.begin_epoch(epoch + 1)
            t_epoch = time.perf_counter()
            stats = EpochStats(dev)
            with timing.phase("train"):
                for i, (x, y) in enumerate(loader.epoch(gen)):
                    if should_stop is not None and should_stop():
                        raise Cancelled(f"stopped during epoch {epoch + 1}")
                    lr = lr_at(sched.lr, epoch + i / steps_per_epoch, sched.epochs)
                    stats.add(train_step(model, optimizer, scaler, recipe, x, y, lr=lr,
                                         precision=spec.compute.precision,
                                         channels_last=channels_last), y)
                    if bar is not None:
                        bar.update(1)
            train_seconds = time.perf_counter() - t_epoch
            with timing.phase("monitor"):
                mon = (monitor(model, mon_x, mon_y, eps=eps, norm=norm,
                               steps=ev.monitor.pgd_steps, alpha=ev.monitor.pgd_alpha,
                               batch_size=max(sched.batch_size, 256)) if n_mon else None)
            co = watchdog.check(epoch + 1, mon) if mon else False
            if mon and (best is None or mon["pgd_acc"] > best["monitor_pgd_acc"]):
                best = {"epoch": epoch + 1, "monitor_pgd_acc": mon["pgd_acc"],
                        "monitor_clean_acc": mon["clean_acc"]}
                save_weights(out / BEST, model, {**meta, "epoch": str(epoch + 1)})
            row = {
                "epoch": epoch + 1,
                "lr": lr,  # at the epoch's last step
                **stats.summary(),
                "monitor": mon,
                "catastrophic_overfitting": co,
                "seconds": time.perf_counter() - t_epoch,
                "train_seconds": train_seconds,
            }
            history.append(row)
            if bar is not None and mon:
                bar.set_postfix(epoch=epoch + 1, clean=f"{mon['clean_acc']:.3f}",
                                pgd=f"{mon['pgd_acc']:.3f}")
            with timing.phase("checkpoint"):
                save_checkpoint(ckpt_path, {
                    "epoch": epoch + 1, "spec": spec.model_dump_json(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "recipe": recipe.state_dict(), "watchdog": watchdog.state_dict(),
                    "history": history, "best": best, "timing": dict(timing.seconds),
                    "rng": {"torch": torch.get_rng_state(), "seed": sched.seed},
                })
            emit("epoch", row)
            if co:
                emit("catastrophic_overfitting", watchdog.events[-1])
    finally:
        if bar is not None:
            bar.close()

    emit("phase", {"phase": "final_evaluation"})
    with timing.phase("final_evaluation"):
        test_x, test_y = data.test_x, data.test_y
        if ev.final.n is not None:
            test_x, test_y = test_x[:ev.final.n], test_y[:ev.final.n]
        test_x, test_y = test_x.to(dev).float().div_(255), test_y.to(dev)
        candidates = {"last": model}
        if recipe.weight_average is not None:
            candidates["wa"] = recipe.weight_average.module
        if best is not None and "best" in ev.final.models:
            best_model = copy.deepcopy(model)
            candidates["best"] = load_weights(out / BEST, best_model, device=dev)
        finals = {}
        for name in ev.final.models:
            if name not in candidates:
                continue
            emit("phase", {"phase": "final_evaluation", "model": name})
            torch.manual_seed(epoch_seed(sched.seed, sched.epochs))
            finals[name] = final_evaluation(
                candidates[name], test_x, test_y, ev.final, eps=eps, norm=norm,
                num_classes=data.num_classes, seed=sched.seed,
                on_phase=lambda p, m=name: emit("phase", {"phase": p, "model": m}))
            finals[name]["model"] = name
        final = finals.get("last") or next(iter(finals.values()))
    certification = None
    if ev.certification is not None:
        from workers.certification import run_certification

        emit("phase", {"phase": "certification"})
        with timing.phase("certification"):
            certification = run_certification(
                model, data.test_x.to(dev).float().div_(255), data.test_y.to(dev),
                ev.certification, num_classes=data.num_classes, out=out,
                precision=spec.compute.precision, channels_last=channels_last, seed=sched.seed,
                emit=emit)

    save_weights(out / "model.safetensors", model, meta)
    if recipe.weight_average is not None:
        save_weights(out / WA, recipe.weight_average.module, {**meta, "model": "wa"})
    last_pgd = history[-1]["monitor"]["pgd_acc"] if history and history[-1]["monitor"] else None
    selection = None if best is None else {
        **best, "last_epoch": sched.epochs, "last_monitor_pgd_acc": last_pgd,
        "robust_generalization_gap": None if last_pgd is None
        else best["monitor_pgd_acc"] - last_pgd,
        "note": "best = the epoch with the highest monitor PGD accuracy (validation slice); "
                "the gap is best minus last"}
    timing.seconds["total"] = time.perf_counter() - t_start
    report = {
        "report_version": REPORT_VERSION,
        "spec": spec.model_dump(mode="json"),
        "environment": environment(dev, sched.seed, channels_last, spec.compute.precision),
        "dataset": {"name": data.name, "num_classes": data.num_classes,
                    "train": int(train_x.shape[0]), "validation": int(val_x.shape[0]),
                    "test": int(data.test_x.shape[0]), "monitor": n_mon,
                    "shape": list(data.train_x.shape[1:])},
        "history": history,
        "events": watchdog.events,
        "final": final,
        "final_models": finals,
        "selection": selection,
        "certification": certification,
        "timing": {k: round(v, 3) for k, v in timing.seconds.items()},
        "artifacts": [n for n in ("report.json", "model.safetensors", BEST, WA, CERTIFY_TSV,
                                  CHECKPOINT) if n == "report.json" or (out / n).exists()],
    }
    write_json(out / "report.json", report)
    emit("finished", {"final": final})
    return report

