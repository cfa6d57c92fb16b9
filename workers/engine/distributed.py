"""One job on several devices: ``compute.devices: N`` trains with torch.distributed and
DistributedDataParallel (NCCL on GPUs, gloo on the CPU).

``launch(spec, device, ...)`` makes this process rank 0 and starts ranks 1..N-1 as fresh
processes (the ``spawn`` start method: never a fork of a process that holds torch state). Every
rank loads the data, builds the same model from the same seed, restores the same checkpoint and
steps on its contiguous slice of each global batch (``bulwark.attacks.shard``): the global batch is
``schedule.batch_size``, as in a one-process run, and the learning rate means what it means
there. Rank 0 alone emits events, runs the monitor (its figures are broadcast, so that every
rank's watchdog takes the same decisions) and writes checkpoints. Certification is shared too
(chunks dealt round-robin, each from its own seeded generator: the rows of a one-process run,
gathered in order), and so is the final evaluation (each rank attacks a contiguous share of the
test images; the counts are pooled). A rank that dies makes the others' next collective fail:
the job fails with its last checkpoint intact and an attempt on any number of devices resumes
from it."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bulwark.attacks.shard import Share, split
from bulwark.contract.spec import JobSpec


class RankLost(RuntimeError):
    """A rank of the job died (killed, out of memory, its device lost): the others' collective
    failed. The job's last checkpoint is intact; it is retried, or resumed by hand."""


TIMEOUT = dt.timedelta(seconds=int(os.environ.get("BULWARK_DDP_TIMEOUT_SECONDS", "300")))


def world_size(spec: JobSpec, device: torch.device) -> int:
    """The number of ranks ``compute.devices`` asks for on ``device``."""
    n = spec.compute.devices
    if n == "all":
        if device.type != "cuda":
            raise ValueError("compute.devices: 'all' counts CUDA devices and torch sees none; "
                             "give a number of CPU ranks instead")
        return torch.cuda.device_count()
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise ValueError(f"compute.devices: {n} but torch sees {torch.cuda.device_count()} "
                         "CUDA devices")
    return int(n)


@dataclass
class Ranks:
    """This process's place among the job's ranks, and the collectives the runner needs."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, total: int) -> Share:
        start, stop = split(total, self.world, self.rank)
        return Share(self.rank, self.world, start, stop, total)

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a stop request, a non-finite step)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled by torch between our own processes)."""
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type ==
                                   "cuda" else None)
        return box[0]

    def gather(self, items: list) -> list:
        """Every rank's ``items``, concatenated in rank order (on every rank)."""
        parts: list = [None] * self.world
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def wrap(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        """``model`` under DDP (its parameters stay ``model``'s own)."""
        if sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)


@dataclass
class OneProcess:
    """The stand-in for ``Ranks`` in a job of one process: rank 0 of 1, no share of a batch
    (``share`` is None: the whole batch, no sharding), every collective the identity."""

    device: torch.device
    rank: int = 0
    world: int = 1
    main: bool = True

    def share(self, total: int) -> Share | None:
        return None

    def agree(self, flag: bool) -> bool:
        return flag

    def broadcast(self, obj: Any) -> Any:
        return obj

    def gather(self, items: list) -> list:
        return list(items)

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def wrap(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


def _init(rank: int, world: int, port: int, device: torch.device) -> Ranks:
    dev = _rank_device(device, rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    return Ranks(rank, world, dev)


def _die_with_parent() -> None:
    """Linux: this rank gets SIGKILL when rank 0's process dies, whatever kills it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def leave() -> None:
    """The end of a rank 1..N-1 that finished its work: meet the others, close the group and
    exit at once. Leaving through the interpreter's finalization instead can abort the process
    (gloo's worker threads outlive the interpreter: "terminate called without an active
    exception", exit code -6) after all of its work was done."""
    import sys

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def join(rank: int, world: int, port: int, payload: dict[str, Any]) -> Ranks:
    """In ranks 1..N-1 (the ``train`` that ``launch`` starts): threads, device, the group."""
    _die_with_parent()
    torch.set_num_threads(payload["threads"])
    return _init(rank, world, port, torch.device(payload["device"]))


@contextlib.contextmanager
def launch(spec: JobSpec, device: torch.device, train: Callable[..., None], *, out: Path,
           resume: bool, weights: str | Path | None,
           data_path: str | Path | None) -> Iterator[Ranks | None]:
    """Rank 0 of ``spec``'s ranks for the block (None for a one-device job); the other ranks
    run ``train(rank, world, port, payload)`` (a module-level function: the runner's) as child
    processes, and are gone when the block ends."""
    world = world_size(spec, device)
    if world <= 1:
        yield None
        return
    if spec.compute.sync_batchnorm and device.type != "cuda":
        raise ValueError("compute.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm is "
                         "GPU-only); on the CPU each rank keeps its own BatchNorm statistics")
    if world > spec.schedule.batch_size:
        raise ValueError(f"compute.devices: {world} ranks need schedule.batch_size >= {world} "
                         f"(got {spec.schedule.batch_size}); the batch is the global batch")
    threads = torch.get_num_threads()
    share = max(1, threads // world) if device.type == "cpu" else threads
    port = _free_port()
    payload = {"spec": spec.model_dump_json(), "out": str(out), "device": str(device),
               "resume": resume, "threads": share,
               "weights": None if weights is None else str(weights),
               "data_path": None if data_path is None else str(data_path)}
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=train, args=(r, world, port, payload), daemon=True,
                         name=f"bulwark-rank{r}") for r in range(1, world)]
    for p in procs:
        p.start()
    torch.set_num_threads(share)
    try:
        me = _init(0, world, port, device)
        try:
            yield me
            dist.barrier()  # every rank is done with its collectives: tear down together
        except Exception as e:
            for p in procs:
                p.join(timeout=2)  # a peer's death is what broke the collective?
            lost = [(p.name, p.exitcode) for p in procs if p.exitcode not in (None, 0)]
            if lost:
                raise RankLost(
                    f"{', '.join(f'{n} ended (exit code {c})' for n, c in lost)} during training; "
                    "the last checkpoint is intact: resume the job (on any number of devices)"
                ) from e
            raise
        finally:
            dist.destroy_process_group()
        for p in procs:
            p.join(timeout=TIMEOUT.total_seconds())
        failed = [p.name for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"rank(s) {', '.join(failed)} ended with exit codes "
                               f"{[p.exitcode for p in procs]}")
    finally:
        torch.set_num_threads(threads)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
