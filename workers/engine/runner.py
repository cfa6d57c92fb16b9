"""The job runner: data → model → recipe → epochs (train, monitor, checkpoint) → final report.

One call, ``run_job(spec, out_dir)``, used by ``bulwark run`` and by the Celery task. The whole
training set lives on the device as one uint8 tensor; batches are augmented there. Every epoch
starts from RNG states derived from (seed, epoch), and a checkpoint is written atomically at the
end of every epoch, so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from bulwark.attacks import shard
from bulwark.contract.artifacts import (
    BEST,
    CHECKPOINT,
    FINAL_STATE,
)
from bulwark.contract.presets import describe_recipe
from bulwark.contract.report import Report
from bulwark.contract.spec import SINGLE_STEP, JobSpec, RecipeSpec, as_spec, remedied, same_spec
from bulwark.contract.tracking import TrackingServers
from bulwark.defenses import Recipe, StepOutput
from bulwark.defenses.precision import autocast
from bulwark.workers.engine.checkpoint import (
    check_normalization,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    weights_metadata,
)
from bulwark.workers.engine.data import DeviceLoader, load_dataset, split_validation
from bulwark.workers.engine.distributed import OneProcess, Ranks, join, launch, leave
from bulwark.workers.engine.final_attacks import FinalLedger, final_evaluation, weights_digest
from bulwark.workers.engine.models import build_model
from bulwark.workers.engine.monitor import COWatchdog, monitor
from bulwark.workers.engine.reporting import build_report, write_report
from bulwark.workers.engine.schedule import build_optimizer, epsilon_at, lr_at, warmed_up

Event = Callable[[str, dict[str, Any]], None]


class Cancelled(Exception):
    """Raised inside the loop when ``should_stop`` says so; the last checkpoint stands."""


class Diverged(ValueError):
    """Training went non-finite and could not go on: the job fails (not retried)."""


class NonFiniteStep(ArithmeticError):
    """A step's loss, a loss term or the gradient was non-finite; the step was skipped (the
    weights, optimizer and recipe state are as before it)."""

    def __init__(self, terms: list[str]):
        super().__init__(", ".join(terms))
        self.terms = terms


def nonfinite_terms(out: StepOutput, model: torch.nn.Module, *, grads: bool) -> list[str]:
    """The names of what went non-finite in a step (loss terms first, then ``loss``,
    ``gradient``); [] when all is finite. One host synchronization."""
    names = [*sorted(out.metrics), "loss"]
    vals = [out.metrics[k].detach().float().sum() for k in names[:-1]]
    vals.append(out.loss.detach().float())
    if grads:
        params = [p.grad for p in model.parameters() if p.grad is not None]
        if params:
            names.append("gradient")
            vals.append(torch.nn.utils.get_total_norm(params).float())
    finite = torch.isfinite(torch.stack(vals))
    if bool(finite.all()):
        return []
    return [n for n, ok in zip(names, finite.tolist(), strict=True) if not ok]


class StepsDiverged(Exception):
    """More non-finite steps in an epoch than evaluation.monitor.max_nonfinite_steps."""

    def __init__(self, info: dict[str, Any]):
        super().__init__(diverged_message(info))
        self.info = info


def diverged_message(info: dict[str, Any]) -> str:
    return (f"training diverged in epoch {info['epoch']}, step {info['step']}: "
            f"{' and '.join(info['terms'])} went non-finite (lr {info['lr']:.3g}); that step "
            f"was skipped ({info['skipped_steps']} skipped in the epoch), so the weights are "
            "still finite, and the last checkpoint is the previous epoch's. Lower "
            "schedule.lr.lr_max or the regularizer's λ, add threat.epsilon_warmup, or set "
            "evaluation.monitor.on_catastrophic_overfitting: remediate to roll back")


@dataclass
class Timing:
    """Seconds per phase, and the run's total. A resumed run adds what its earlier processes
    spent on the work it keeps (``carry``: a checkpoint's figures, the final suite's kept
    batches), so its report counts the whole run, not only its last process."""

    seconds: dict[str, float] = field(default_factory=dict)
    carried: float = 0.0  # earlier processes' total
    t0: float = field(default_factory=time.perf_counter)

    def total(self) -> float:
        return self.carried + time.perf_counter() - self.t0

    def snapshot(self) -> dict[str, float]:
        """The phases so far and ``total``: what a checkpoint keeps."""
        return {**self.seconds, "total": self.total()}

    def carry(self, earlier: dict[str, float]) -> None:
        """Add an earlier process's figures (a :meth:`snapshot`; ``total`` may be absent)."""
        for k, v in earlier.items():
            if k == "total":
                self.carried += float(v)
            else:
                self.seconds[k] = self.seconds.get(k, 0.0) + float(v)

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


# device types whose recorded step-cost figures (docs/benchmarks.md) show torch.compile's
# training step winning over the eager one: compute.compile "auto" turns it on there. None yet:
# on the CPU the compiled step is 1.1-1.7x slower on SmallCNN (every recipe measured) and mixed
# on PreActResNet-18 (ELLE 0.86x, FGSM 1.26x), after 13-29 s of compilation; GPU figures owed.
COMPILE_WINS: frozenset[str] = frozenset()


def compile_on(setting: str, device: torch.device) -> bool:
    """compute.compile resolved for ``device``: on, off, or auto (on where it wins)."""
    return setting == "on" or (setting == "auto" and device.type in COMPILE_WINS)


def channels_last_on(setting: str, device: torch.device) -> bool:
    """``compute.channels_last``: ``auto`` is on for CUDA and the CPU, where it was measured
    faster for every model and step (docs/benchmarks.md: SmallCNN 1.18-1.27x, PreActResNet-18
    1.04x a training step on the CPU; PGD 1.36x), and off elsewhere (MPS)."""
    return setting == "on" or (setting == "auto" and device.type in ("cuda", "cpu"))


def judge(watchdog: COWatchdog, t: float, mon: dict[str, Any] | None,
          warmup: float) -> bool:
    """The watchdog's verdict on the monitor figures of check ``t`` (in epochs: an epoch's end,
    or a probe within it): during a longer ε warm-up the figures (at the full ε) are recorded,
    not judged (``schedule.warmed_up``)."""
    if not mon or not warmed_up(t, warmup):
        return watchdog.flagged
    return watchdog.check(t, mon)


PROBE_BUDGET = 0.10  # of an epoch's training work, at most
PROBE_AUTO = 3


def probes_per_epoch(mon: Any, adversary: str, n_train: int, n_probe: int) -> int:
    """``monitor.probes`` resolved: ``auto`` is up to PROBE_AUTO probes for a single-step
    adversary, as many as cost at most PROBE_BUDGET of the epoch's training. Training costs
    about 2 forward-backward passes an image (the attack's and the step's); a probe about
    ``probe_pgd_steps + 2`` an image (clean, FGSM and PGD, forward passes a third)."""
    if mon.probes != "auto":
        return int(mon.probes)
    if adversary not in SINGLE_STEP or n_probe == 0:
        return 0
    affordable = PROBE_BUDGET * 2 * n_train / (n_probe * (mon.probe_pgd_steps + 2))
    return max(0, min(PROBE_AUTO, int(affordable)))


def probe_steps(probes: int, steps: int) -> set[int]:
    """The 1-based steps of an epoch after which its ``probes`` probes run, evenly spaced
    (the epoch's end has its own check)."""
    return {round(k * steps / (probes + 1)) for k in range(1, probes + 1)} - {0, steps}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, recipe: Recipe, x: torch.Tensor, y: torch.Tensor,
               *, lr: float, precision: str, channels_last: bool,
               ranks: Ranks | OneProcess | None = None) -> StepOutput:
    """One optimizer step of ``recipe`` on (x, y) at learning rate ``lr``; NonFiniteStep
    (nothing updated) when the loss, a term of it or the gradient is not finite.

    With ``ranks`` (a DDP step: ``model`` is the DDP module, (x, y) this rank's shard, inside
    ``bulwark.attacks.shard.sharing``) the loss is weighted by N·b_r/B, so that DDP's average of the
    ranks' gradients is the global batch mean, and a non-finite step on any rank is skipped on
    all of them."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, precision):
        out = recipe.step(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    weight = shard.weight()
    scaler.scale(out.loss if weight == 1.0 else out.loss * weight).backward()
    # fp16's loss scaler skips inf/NaN gradient steps itself (that is how it finds its scale)
    bad = nonfinite_terms(out, model, grads=precision != "fp16")
    if ranks is not None and ranks.agree(bool(bad)) and not bad:
        bad = ["another rank's step"]
    if bad:
        optimizer.zero_grad(set_to_none=True)
        recipe.abandon_step(model)
        raise NonFiniteStep(bad)
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

    def summary(self, ranks: Ranks | OneProcess | None = None) -> dict[str, Any]:
        """The epoch's means (over every rank's examples with ``ranks``)."""
        keys = sorted(self.sums)
        packed = torch.stack([self.loss_sum.float(), self.correct.float()]
                             + [self.sums[k].float() for k in keys]).tolist()
        steps = max(self.steps, 1)
        # loss and correct sums, examples seen, per-step metric means
        totals = [packed[0], packed[1], float(self.seen), *(v / steps for v in packed[2:])]
        world = 1
        if ranks is not None:  # summed over the ranks; the metric means averaged over them
            totals, world = ranks.sum(totals), ranks.world
        n = max(totals[2], 1)
        return {"train_loss": totals[0] / n, "train_acc": totals[1] / n,
                "metrics": {k: v / world for k, v in zip(keys, totals[3:], strict=True)}}


def merge_finals(parts: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The final figures of the whole test set from each rank's figures on its share (in rank
    order): counts add up, accuracies are recomputed from them."""
    def pooled(figures: list[tuple[float, int]]) -> tuple[float, int]:
        n = sum(k for _, k in figures)
        return sum(round(a * k) for a, k in figures) / max(n, 1), n

    out: dict[str, dict[str, Any]] = {}
    for name, first in parts[0].items():
        ours = [p[name] for p in parts]
        clean, n = pooled([(f["clean_acc"], f["n"]) for f in ours])
        attacks = {}
        for attack, res in first["attacks"].items():
            acc, m = pooled([(f["attacks"][attack]["acc"], f["attacks"][attack]["n"])
                             for f in ours])
            attacks[attack] = {**res, "acc": acc, "n": m}
        out[name] = {**first, "clean_acc": clean, "n": n, "attacks": attacks}
    return out


class Training:
    """One job's state, built once; the methods are the phases of ``run_job``."""

    def __init__(self, spec: JobSpec, out: Path, dev: torch.device, timing: Timing,
                 weights: str | Path | None, data_path: str | Path | None = None,
                 ranks: Ranks | None = None):
        self.spec, self.out, self.dev, self.timing = spec, out, dev, timing
        # this rank of a multi-process job (rank 0 writes, emits, monitors), or the
        # single-process stand-in whose collectives are the identity
        self.ranks: Ranks | OneProcess = ranks or OneProcess(dev)
        self.writes = self.ranks.main
        self.channels_last = channels_last_on(spec.compute.channels_last, dev)
        sched, ev = spec.schedule, spec.evaluation
        with timing.phase("data"):
            dataset = spec.dataset if data_path is None else spec.dataset.model_copy(
                update={"path": str(data_path)})
            self.data = data = load_dataset(dataset)
            train_x, train_y, val_x, val_y = split_validation(
                data.train_x, data.train_y, spec.dataset.val_size, sched.seed)
            self.sizes = {"train": int(train_x.shape[0]), "validation": int(val_x.shape[0])}
            # the final suite's images: the test set, or (to choose a setting) the held-out slice
            self.eval_x, self.eval_y = ((val_x, val_y) if ev.final.split == "validation"
                                        else (data.test_x, data.test_y))
            self.loader = DeviceLoader(train_x, train_y, sched.batch_size, device=dev,
                                       crop_padding=data.crop_padding, flip=data.flip,
                                       shuffle=True)
            self.n_mon = min(ev.monitor.size, val_x.shape[0])
            self.mon_x = self.layout(val_x[:self.n_mon].to(dev).float().div_(255))
            self.mon_y = val_y[:self.n_mon].to(dev)

        torch.manual_seed(sched.seed)
        mean, std = ((data.mean, data.std) if spec.model.normalization == "dataset"
                     else ((0.0,) * data.channels, (1.0,) * data.channels))
        model = build_model(spec.model.arch, num_classes=data.num_classes,
                            in_channels=data.channels, image_size=data.image_size,
                            mean=mean, std=std, depth=spec.model.depth,
                            widen_factor=spec.model.widen_factor).to(dev)
        weights = weights or spec.model.weights
        if weights:
            try:
                recorded = weights_metadata(Path(weights))
                load_weights(Path(weights), model, device=dev)
            except (OSError, RuntimeError, SafetensorError) as e:
                raise ValueError(f"model.weights {weights}: cannot load into a "
                                 f"{spec.model.arch} for this dataset: {e}") from e
            check_normalization(recorded, mean, std, where=f"model.weights {weights}")
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        # what a training step runs: the DDP module (sharing ``model``'s parameters) or model
        self.net = self.ranks.wrap(model, spec.compute.sync_batchnorm)
        self.compiled = compile_on(spec.compute.compile, dev)
        if self.compiled:  # the training step only: evaluation and the EMA copies stay eager
            self.net = torch.compile(self.net)
        self.optimizer = build_optimizer(model.parameters(), sched)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=spec.compute.precision == "fp16")
        self.steps_per_epoch = len(self.loader)
        self.use_recipe(spec.recipe)
        mon_spec = ev.monitor
        self.watchdog = COWatchdog(mon_spec.co_drop, mon_spec.co_gap,
                                   co_patience=mon_spec.co_patience, co_rise=mon_spec.co_rise,
                                   co_resist=mon_spec.co_resist, mask_gap=mon_spec.masking_gap)
        self.n_probe = min(mon_spec.probe_size, self.n_mon)
        self.probe_after = probe_steps(probes_per_epoch(
            mon_spec, spec.recipe.adversary.kind, self.sizes["train"], self.n_probe),
            self.steps_per_epoch) if self.n_probe else set()
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # the epoch with the best monitor PGD acc
        self.start_epoch = 0
        self.stopped_early: dict[str, Any] | None = None
        self.remediations: list[dict[str, Any]] = []  # the watchdog's actions (remediate)
        self.healthy: dict[str, Any] | None = None  # the state after the last CO-free epoch
        # what load_model needs to rebuild the network (safetensors metadata is str -> str)
        self.meta = {"arch": spec.model.arch, "num_classes": str(data.num_classes),
                     "in_channels": str(data.channels), "image_size": str(data.image_size),
                     "mean": json.dumps(list(mean)), "std": json.dumps(list(std)),
                     "depth": str(spec.model.depth), "widen_factor": str(spec.model.widen_factor),
                     "dataset": data.name, "format": "bulwark-v1"}

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the model's memory format (the attacks keep it: elementwise ops
        preserve it)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ---------------------------------------------------------------------- checkpoints
    def checkpoint(self, epoch: int) -> None:
        if not self.writes:
            return
        with self.timing.phase("checkpoint"):
            save_checkpoint(self.out / CHECKPOINT, {
                "epoch": epoch, "spec": self.spec.model_dump_json(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "recipe": self.recipe.state_dict(),
                "watchdog": self.watchdog.state_dict(), "history": self.history,
                "best": self.best, "timing": self.timing.snapshot(),
                "stopped_early": self.stopped_early,
                "recipe_spec": self.recipe_spec.model_dump_json(),
                "remediations": self.remediations,
                "rng": {"torch": torch.get_rng_state(), "seed": self.spec.schedule.seed},
            })

    def restore(self) -> bool:
        """Continue from ``checkpoint.pt`` if there is one; it must come from the same spec."""
        path = self.out / CHECKPOINT
        if not path.exists():
            return False
        state = load_checkpoint(path, map_location=self.dev)
        if not same_spec(json.loads(state.get("spec") or "{}"),
                         json.loads(self.spec.model_dump_json())):
            raise ValueError(f"{path} was written for a different job spec; resume with "
                             "the same spec, or start over in another folder")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.remediations = list(state.get("remediations") or [])
        if state.get("recipe_spec"):  # a remediated run goes on with the recipe it switched to
            self.use_recipe(RecipeSpec.model_validate_json(state["recipe_spec"]))
        self.recipe.load_state_dict(state["recipe"])
        self.watchdog.load_state_dict(state["watchdog"])
        self.history, self.best = list(state["history"]), state["best"]
        self.start_epoch = int(state["epoch"])
        self.stopped_early = state.get("stopped_early")
        self.timing.carry(state["timing"])
        return True

    def use_recipe(self, recipe: RecipeSpec) -> None:
        """Train with ``recipe`` from now on (a fresh ``Recipe``: its running state starts
        over)."""
        self.recipe_spec = recipe
        threat = self.spec.threat
        self.recipe = Recipe(recipe, eps=threat.training_epsilon, norm=threat.norm)
        self.recipe.bind(self.model, self.steps_per_epoch * self.spec.schedule.epochs)

    # ---------------------------------------------------------------------- remediation
    def snapshot(self, epoch: int) -> dict[str, Any]:
        """The training state after ``epoch`` epochs, copied (on the device it lives on)."""
        return copy.deepcopy({
            "epoch": epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "watchdog": self.watchdog.state_dict(), "history": self.history,
            "best": self.best})

    def remediate(self, epoch: int, row: dict[str, Any]) -> dict[str, Any] | None:
        """The alarm (or a divergence) in ``epoch``: roll back to the last healthy state (the
        last epoch's end with no FGSM-PGD gap open: before the gap that became the alarm) and
        go on with the next remedy of ``evaluation.monitor.remedies`` that applies. The
        watchdog's events since then stay on record. None when no remedy is left (the event
        is then only recorded)."""
        tried = {r["remedy"] for r in self.remediations}
        for remedy in self.spec.evaluation.monitor.remedies:
            if remedy in tried:
                continue
            recipe = remedied(self.recipe_spec, remedy)
            if recipe is None:
                continue
            back = self.healthy
            seen = self.watchdog.events[len(back["watchdog"]["events"]):]
            discarded = [h["epoch"] for h in self.history[len(back["history"]):]] + [epoch]
            self.model.load_state_dict(back["model"])
            self.optimizer.load_state_dict(back["optimizer"])
            self.scaler.load_state_dict(back["scaler"])
            self.watchdog.load_state_dict(back["watchdog"])
            self.watchdog.events.extend(seen)  # the record keeps what was seen
            self.history, self.best = copy.deepcopy(back["history"]), copy.deepcopy(back["best"])
            self.use_recipe(recipe)
            action = {"epoch": epoch, "remedy": remedy, "rolled_back_to": back["epoch"],
                      "recipe": describe_recipe(recipe), "discarded": row,
                      "discarded_epochs": discarded}
            self.remediations.append(action)
            self.checkpoint(back["epoch"])  # a resume goes on with the new recipe
            return action
        return None

    # ---------------------------------------------------------------------- training
    def fit(self, emit: Event, should_stop: Callable[[], bool] | None, progress: bool) -> None:
        sched = self.spec.schedule
        bar = None
        if progress and self.spec.mode == "train":  # evaluate mode trains nothing
            from bulwark.workers.engine.bars import bar as progress_bar
            bar = progress_bar(total=self.steps_per_epoch * sched.epochs,
                               initial=self.start_epoch * self.steps_per_epoch, unit="step",
                               desc=f"{self.spec.name or self.spec.recipe.preset or 'job'} "
                                    "train")
        emit("started", {"epochs": sched.epochs, "start_epoch": self.start_epoch,
                         "device": str(self.dev)})
        last_epoch = sched.epochs if self.spec.mode == "train" and not self.stopped_early else 0
        policy = self.spec.evaluation.monitor.on_catastrophic_overfitting
        epoch = self.start_epoch

        def rolled_back(action: dict[str, Any]) -> int:
            emit("remediated", {k: v for k, v in action.items() if k != "discarded"})
            if bar is not None:
                bar.n = action["rolled_back_to"] * self.steps_per_epoch
                bar.refresh()
            return action["rolled_back_to"]

        if policy == "remediate":
            self.healthy = self.snapshot(epoch)
        try:
            while epoch < last_epoch:
                seen = len(self.watchdog.events)
                try:
                    row = self.epoch(epoch, should_stop, bar)
                except StepsDiverged as d:
                    emit("diverged", d.info)
                    action = (self.remediate(epoch + 1, {"diverged": d.info})
                              if policy == "remediate" else None)
                    if action is None:
                        raise Diverged(str(d)) from None
                    epoch = rolled_back(action)
                    continue
                new = self.watchdog.events[seen:]  # onsets this epoch: CO, accuracy collapse
                co = any(e["type"] == "catastrophic_overfitting" for e in new)
                if co and policy == "remediate":
                    action = self.remediate(epoch + 1, row)
                    if action is not None:
                        for event in new:
                            emit(event["type"], event)
                        epoch = rolled_back(action)
                        continue
                self.history.append(row)
                if co and policy == "stop":
                    self.stopped_early = {"epoch": epoch + 1, "reason": "catastrophic_overfitting"}
                self.checkpoint(epoch + 1)
                if policy == "remediate" and not self.watchdog.gap:  # no gap open: healthy
                    self.healthy = self.snapshot(epoch + 1)
                emit("epoch", row)
                for event in new:
                    emit(event["type"], event)
                if self.stopped_early:
                    emit("stopped_early", self.stopped_early)
                    break
                epoch += 1
        finally:
            if bar is not None:
                bar.close()

    def epoch(self, epoch: int, should_stop: Callable[[], bool] | None, bar) -> dict[str, Any]:
        """Train one epoch (0-based ``epoch``), monitor it; returns its history row."""
        sched, ev, spec = self.spec.schedule, self.spec.evaluation, self.spec
        torch.manual_seed(epoch_seed(sched.seed, epoch))
        gen = torch.Generator(device="cpu").manual_seed(epoch_seed(sched.seed, epoch) + 1)
        self.model.train()
        self.recipe.begin_epoch(epoch + 1)
        t_epoch = time.perf_counter()
        stats = EpochStats(self.dev)
        probes: list[dict[str, Any]] = []
        lr = 0.0
        skipped, first_bad = 0, None
        ranks = self.ranks
        with self.timing.phase("train"):
            for i, (x, y) in enumerate(self.loader.epoch(gen)):
                stop = should_stop is not None and should_stop()
                if stop or ranks.agree(stop):
                    raise Cancelled(f"stopped during epoch {epoch + 1}")
                t = epoch + i / self.steps_per_epoch
                lr = lr_at(sched.lr, t, sched.epochs)
                self.recipe.set_epsilon(epsilon_at(spec.threat.training_epsilon,
                                                   spec.threat.epsilon_warmup, t))
                part = ranks.share(y.shape[0])
                if part is not None:  # this rank's slice; an empty one steps on an example
                    sl = slice(part.start, part.stop) if part.size else slice(0, 1)  # at weight
                    x, y = x[sl], y[sl]  # 0: DDP needs every rank's backward
                try:
                    with shard.sharing(part):
                        out = train_step(self.net, self.optimizer, self.scaler, self.recipe,
                                         x, y, lr=lr, precision=spec.compute.precision,
                                         channels_last=self.channels_last, ranks=ranks)
                    if part is None or part.size:
                        stats.add(out, y)
                except NonFiniteStep as e:
                    skipped += 1
                    first_bad = first_bad or {"epoch": epoch + 1, "step": i + 1,
                                              "terms": e.terms, "lr": lr}
                    if skipped > ev.monitor.max_nonfinite_steps:
                        raise StepsDiverged({**first_bad, "skipped_steps": skipped}) from None
                if bar is not None:
                    bar.update(1)
                if i + 1 in self.probe_after:
                    probes.append(self.probe(epoch + (i + 1) / self.steps_per_epoch))
        train_seconds = time.perf_counter() - t_epoch - sum(p["seconds"] for p in probes)
        summary = stats.summary(ranks)
        mon = None
        if self.n_mon:
            with self.timing.phase("monitor"):
                if self.writes:
                    mon = monitor(self.model, self.mon_x, self.mon_y, eps=spec.threat.epsilon,
                                  norm=spec.threat.norm, steps=ev.monitor.pgd_steps,
                                  alpha=ev.monitor.pgd_alpha,
                                  batch_size=max(sched.batch_size, 256),
                                  dlr_pgd=ev.monitor.masking_gap is not None)
                mon = ranks.broadcast(mon)  # one set of figures: every watchdog decides alike
        co = judge(self.watchdog, epoch + 1, mon, spec.threat.epsilon_warmup)
        if mon and (self.best is None or mon["pgd_acc"] > self.best["monitor_pgd_acc"]):
            self.best = {"epoch": epoch + 1, "monitor_pgd_acc": mon["pgd_acc"],
                         "monitor_clean_acc": mon["clean_acc"]}
            if self.writes:
                save_weights(self.out / BEST, self.model,
                             {**self.meta, "epoch": str(epoch + 1)})
        if bar is not None and mon:
            bar.set_postfix(epoch=epoch + 1, clean=f"{mon['clean_acc']:.3f}",
                            pgd=f"{mon['pgd_acc']:.3f}")
        return {"epoch": epoch + 1, "lr": lr,  # lr and training ε at the epoch's last step
                "train_epsilon": self.recipe.eps,
                **summary, **({"skipped_steps": skipped, "first_nonfinite": first_bad}
                              if skipped else {}), "monitor": mon,
                **({"probes": probes} if probes else {}), "catastrophic_overfitting": co,
                "seconds": time.perf_counter() - t_epoch, "train_seconds": train_seconds}

    def probe(self, t: float) -> dict[str, Any]:
        """A check within the epoch at ``t`` (epochs): clean, FGSM and a short PGD on the
        first ``n_probe`` monitor images, judged by the watchdog like an epoch's end. Its
        random draws come from a forked generator: training runs the same with or without."""
        spec, mon_spec = self.spec, self.spec.evaluation.monitor
        t0 = time.perf_counter()
        fig = None
        with self.timing.phase("monitor"):
            if self.writes:
                devices = [self.dev] if self.dev.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    fig = monitor(self.model, self.mon_x[:self.n_probe],
                                  self.mon_y[:self.n_probe], eps=spec.threat.epsilon,
                                  norm=spec.threat.norm, steps=mon_spec.probe_pgd_steps,
                                  alpha=mon_spec.pgd_alpha,
                                  batch_size=max(spec.schedule.batch_size, 256))
            fig = self.ranks.broadcast(fig)
        judge(self.watchdog, t, fig, spec.threat.epsilon_warmup)
        return {"at_epoch": round(t, 4), **fig, "seconds": time.perf_counter() - t0}

    # ---------------------------------------------------------------------- evaluation
    def evaluate(self, emit: Event, check: Callable[[], None]) -> dict[str, dict[str, Any]]:
        """The final suite for each of ``evaluation.final.models`` that exists."""
        ev, sched, data = self.spec.evaluation, self.spec.schedule, self.data
        test_x, test_y = self.eval_x, self.eval_y
        if ev.final.n is not None:
            test_x, test_y = test_x[:ev.final.n], test_y[:ev.final.n]
        part = self.ranks.share(int(test_x.shape[0]))  # this rank's contiguous share
        if part is not None:
            test_x, test_y = test_x[part.start:part.stop], test_y[part.start:part.stop]
        test_x, test_y = self.layout(test_x.to(self.dev).float().div_(255)), test_y.to(self.dev)
        candidates = {"last": self.model}
        if self.recipe.weight_average is not None:
            candidates["wa"] = self.recipe.weight_average.module
        if self.best is not None and "best" in ev.final.models:
            candidates["best"] = load_weights(self.out / BEST, copy.deepcopy(self.model),
                                              device=self.dev)
        finals: dict[str, Any] = {}
        evaluated: dict[str, str] = {}  # weights digest -> the model evaluated with them
        # one process keeps a ledger of finished batches: a stopped evaluation resumes
        ledger = FinalLedger(self.out / FINAL_STATE) if self.ranks.world == 1 else None
        with self.timing.phase("final_evaluation"):
            for name in ev.final.models:
                if name not in candidates:
                    continue
                digest = weights_digest(candidates[name])
                if digest in evaluated:  # e.g. best = the last epoch: the same weights, seeds
                    finals[name] = {**finals[evaluated[digest]], "model": name}  # and attacks
                    continue
                evaluated[digest] = name
                emit("phase", {"phase": "final_evaluation", "model": name,
                               "n": int(test_x.shape[0])})
                torch.manual_seed(epoch_seed(sched.seed, sched.epochs))
                book = None if ledger is None else ledger.model(name, {
                    "weights": digest, "dataset": data.name,
                    "n": int(test_x.shape[0]), "eps": self.spec.threat.epsilon,
                    "norm": self.spec.threat.norm, "seed": sched.seed,
                    "channels_last": self.channels_last,
                    "plan": ev.final.model_dump(mode="json")})
                finals[name] = final_evaluation(
                    candidates[name], test_x, test_y, ev.final, eps=self.spec.threat.epsilon,
                    norm=self.spec.threat.norm, num_classes=data.num_classes, seed=sched.seed,
                    model_name=name,
                    on_phase=lambda p, n, m=name: emit("phase", {"phase": "final_evaluation",
                                                                 "attack": p, "model": m,
                                                                 "n": n}),
                    on_progress=lambda p: emit("evaluation", p), check=check, ledger=book)
                if book is not None:  # the kept batches' seconds, spent by earlier processes
                    self.timing.carry({"final_evaluation": book.before, "total": book.before})
        return finals if self.ranks.world == 1 else merge_finals(self.ranks.gather([finals]))

    def certify(self, emit: Event, check: Callable[[], None]) -> dict[str, Any] | None:
        plan = self.spec.evaluation.certification
        if plan is None:
            return None
        from bulwark.workers.engine.certification import run_certification

        emit("phase", {"phase": "certification"})
        with self.timing.phase("certification"):
            return run_certification(
                self.model, self.eval_x.to(self.dev).float().div_(255),
                self.eval_y.to(self.dev), plan, num_classes=self.data.num_classes,
                out=self.out, precision=self.spec.compute.precision,
                channels_last=self.channels_last, seed=self.spec.schedule.seed, emit=emit,
                check=check, ranks=None if self.ranks.world == 1 else (
                    self.ranks.rank, self.ranks.world, self.ranks.gather))


def run_job(spec: JobSpec, out_dir: str | Path, *, device: str | None = "cpu",
            resume: bool = False, progress: bool = True, on_event: Event | None = None,
            should_stop: Callable[[], bool] | None = None,
            weights: str | Path | None = None,
            data_path: str | Path | None = None,
            tracking_tags: dict[str, str] | None = None,
            tracking: TrackingServers | None = None) -> dict[str, Any]:
    """Train and evaluate ``spec``; write ``report.json`` and ``model.safetensors`` to out_dir.

    ``spec.tracking.mlflow`` (or the default of the operator's ``tracking`` servers) logs the job
    to MLflow, tagged with ``tracking_tags`` (job id, tenant); a tracking failure is an event,
    never a failure. The service passes its ``tracking`` servers, which also bound where a
    server may have artifacts written; ``bulwark run`` trusts the spec's own URI.

    ``weights``: the resolved file of ``spec.model.weights`` (the service resolves uploaded
    model ids; ``bulwark run`` takes the spec's path as it is); ``data_path`` likewise for an
    uploaded npz dataset (the report keeps the spec's ``datasets/<id>``). With ``mode: evaluate`` no
    training happens: the weights are evaluated (and certified) as they are.

    Raises ``Cancelled`` if ``should_stop()`` turns true — checked between training steps,
    after every evaluation batch, every certification chunk and between phases; the
    checkpoint of the last finished epoch remains and ``resume=True`` continues from it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emit = on_event or (lambda kind, data: None)
    from bulwark.workers.engine.tracking import tracker_for

    tracker = tracker_for(spec, emit=emit, tags=tracking_tags or {}, servers=tracking)
    if tracker is None:
        return _run_job(spec, out, emit, device, resume, progress, should_stop, weights,
                        data_path)

    def tracked(kind: str, data: dict[str, Any]) -> None:
        emit(kind, data)
        tracker.on_event(kind, data)

    tracker.start()
    try:
        report = _run_job(spec, out, tracked, device, resume, progress, should_stop, weights,
                          data_path)
    except Cancelled:
        tracker.finish(None, out, "KILLED")
        raise
    except BaseException:
        tracker.finish(None, out, "FAILED")
        raise
    tracker.finish(report, out, "FINISHED")
    return report


def _run_job(spec: JobSpec, out: Path, emit: Event, device: str | None, resume: bool,
             progress: bool, should_stop: Callable[[], bool] | None,
             weights: str | Path | None, data_path: str | Path | None) -> dict[str, Any]:
    timing = Timing()
    def check() -> None:  # every phase checks the cancel flag at a fine grain
        if should_stop is not None and should_stop():
            raise Cancelled("stopped on request")

    dev = resolve_device(device)
    with launch(spec, dev, train_as_rank, out=out, resume=resume, weights=weights,
                data_path=data_path) as ranks:  # None, or rank 0 of compute.devices ranks
        job = Training(spec, out, dev if ranks is None else ranks.device, timing, weights,
                       data_path, ranks=ranks)
        check()
        if resume and job.restore():
            emit("resumed", {"epoch": job.start_epoch})
        job.fit(emit, should_stop, progress)
        check()
        certification = job.certify(emit, check)  # shared by the ranks, as the evaluation
        check()
        emit("phase", {"phase": "final_evaluation"})
        finals = job.evaluate(emit, check)
    check()
    report = build_report(job, finals, certification, timing, job.ranks.world)
    write_report(out, report, certified=certification is not None)
    emit("finished", {"final": report["final"], "verdict": report["verdict"]})
    return report


def train_as_rank(rank: int, world: int, port: int, payload: dict[str, Any]) -> None:
    """Ranks 1..N-1 of a ``compute.devices`` job (processes ``launch`` starts): train
    alongside rank 0, certify and evaluate their share of the test images, then leave."""
    import torch.distributed as dist

    ranks = join(rank, world, port, payload)
    try:
        job = Training(JobSpec.model_validate_json(payload["spec"]), Path(payload["out"]),
                       ranks.device, Timing(), payload["weights"], payload["data_path"],
                       ranks=ranks)
        if payload["resume"]:
            job.restore()
        job.fit(lambda kind, data: None, None, False)
        job.certify(lambda kind, data: None, lambda: None)
        job.evaluate(lambda kind, data: None, lambda: None)
    except BaseException:
        dist.destroy_process_group()
        raise
    leave()


def run(spec, out: str | Path, *, device: str | None = None, resume: bool = False,
        progress: bool = True) -> Report:
    """Run a job locally, no server: ``spec`` is a ``JobSpec``, a mapping or a spec file.
    Writes the run's files to ``out`` and returns the typed report. ``device`` None = CUDA
    when torch sees one, else the CPU. ``resume`` continues from ``out``'s checkpoint."""
    return Report.model_validate(run_job(as_spec(spec), out, device=device, resume=resume,
                                         progress=progress))
