"""One site, several GPUs: a round's local training with DistributedDataParallel (``client-agent --gpus N``).

The agent stays one process for everything that talks to the aggregator or touches the site's
state (download, validation, encoding, the upload): only the training of the round is spread
over ``N`` worker processes, one per GPU, started the way ``torchrun`` starts them (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` in each one's environment; a rendezvous file instead of a TCP port,
so nothing listens on the network). Each worker holds a replica of the global model; DDP
averages the gradients after every backward pass, so the replicas stay identical and rank 0's
weights are the round's local model. The agent reads them back, and assembles, encodes and
uploads the update once, as with one GPU.

**Effective batch.** Each GPU takes the federation's ``batch_size`` volumes per step, so one step
trains on ``N * batch_size`` volumes and an epoch has ``N`` times fewer steps (the usual DDP
semantics). The loss (Dice + cross-entropy, averaged over the batch) and the network
(InstanceNorm, no BatchNorm) do not couple the volumes of a batch, so the averaged gradient is
that of the whole ``N * batch_size`` batch: the round's update equals that of one process
training with batches of ``N * batch_size`` in the same order (:class:`ShardedOrder`), within
float tolerance (``tests/client_agent/test_distributed.py`` checks it with the gloo backend on CPUs).
Augmentation draws differ per rank (each has its own random state).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from client_agent.training import LoopSettings, TrainingError, TrainResult, seed_everything, train_local

__all__ = ["ShardedOrder", "check_gpus", "train_distributed"]


class ShardedOrder(Sampler[int]):
    """Indices of one rank's share of every global batch, in a seeded order that changes each epoch.

    Epoch ``e`` (counted by the calls to ``__iter__``) permutes ``range(n)`` with ``seed + e``,
    wraps around to a whole number of global batches of ``world_size * per_rank_batch`` (as
    ``DistributedSampler`` pads, so every rank takes the same number of steps), and gives rank
    ``r`` the ``r``-th slice of each global batch. With ``world_size=1`` and the global batch size
    it is the order a single process trains in.
    """

    def __init__(self, n: int, *, per_rank_batch: int, world_size: int, rank: int, seed: int) -> None:
        if n < 1:
            raise ValueError(f"the dataset must hold at least one item, got {n}")
        if per_rank_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need per_rank_batch >= 1 and 0 <= rank < world_size, got {per_rank_batch}, {rank}, {world_size}")
        self.n, self.batch, self.world, self.rank, self.seed = n, per_rank_batch, world_size, rank, seed
        self.epoch = 0

    def _global_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        size = self.world * self.batch
        total = math.ceil(self.n / size) * size
        while len(order) < total:
            order += order[: total - len(order)]
        return order

    def __iter__(self) -> Iterator[int]:
        order = self._global_order(self.epoch)
        self.epoch += 1
        size = self.world * self.batch
        for start in range(0, len(order), size):
            yield from order[start + self.rank * self.batch : start + (self.rank + 1) * self.batch]

    def __len__(self) -> int:
        return math.ceil(self.n / (self.world * self.batch)) * self.batch


def check_gpus(processes: int, device_type: str) -> None:
    """Raise :class:`TrainingError` when ``processes`` GPUs are asked for and fewer exist."""
    if processes < 1:
        raise TrainingError(f"--gpus must be >= 1, got {processes}")
    if device_type == "cuda":
        available = torch.cuda.device_count()
        if processes > available:
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(available))
            remedy = f"use --gpus {available} or fewer" if available else "run on a machine with GPUs, or without --gpus"
            raise TrainingError(f"--gpus {processes}: this machine has {available} CUDA GPU(s)"
                                f"{f' ({names})' if names else ''}; {remedy}")
    elif device_type != "cpu":
        raise TrainingError(f"several processes train on CUDA GPUs (or CPUs, for tests); not on {device_type!r}")


@dataclass(frozen=True)
class _Job:
    """What every worker process receives (pickled by the spawn start method)."""

    model: nn.Module
    dataset: Dataset  # type: ignore[type-arg]
    loop: LoopSettings
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_size: int
    seed: int
    world_size: int
    device_type: str
    num_workers: int
    rendezvous: str
    out_dir: str
    # The parent's numeric settings: spawned workers start with torch's defaults otherwise (on
    # Hopper that means TF32 convolutions even where the agent process turned them off).
    cudnn_tf32: bool = True
    matmul_precision: str = "highest"


def _worker(rank: int, job: _Job) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job.world_size))
    cuda = job.device_type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{job.rendezvous}", rank=rank,
                            world_size=job.world_size)
    try:
        device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = job.cudnn_tf32
        torch.set_float32_matmul_precision(job.matmul_precision)
        seed_everything(job.seed)
        reseed = getattr(job.dataset, "reseed", None)
        if reseed is not None:
            reseed(job.seed + rank)
        # A copy: tensors sent to spawned processes live in shared memory, so on CPUs every rank
        # would otherwise step the very same weights (and apply each update world_size times).
        model = copy.deepcopy(job.model).to(device)
        ddp = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
        sampler = ShardedOrder(len(job.dataset), per_rank_batch=job.batch_size,  # type: ignore[arg-type]
                               world_size=job.world_size, rank=rank, seed=job.seed)
        loader = DataLoader(job.dataset, batch_size=job.batch_size, sampler=sampler, num_workers=job.num_workers,
                            persistent_workers=job.num_workers > 0, drop_last=False)
        result = train_local(ddp, loader, job.loop, device=device, loss_fn=job.loss_fn)
        if rank == 0:
            out = Path(job.out_dir)
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "local.pt")
            (out / "result.json").write_text(json.dumps({
                "epoch_losses": result.epoch_losses, "steps": result.steps,
                "volumes": result.volumes * job.world_size, "seconds": result.seconds,
            }))
        # Every rank leaves the group together: a rank that tore gloo down while rank 0 was still
        # writing the weights aborted once in CI ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_distributed(
    model: nn.Module,
    dataset: Dataset,  # type: ignore[type-arg]
    loop: LoopSettings,
    *,
    processes: int,
    batch_size: int,
    seed: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device_type: str = "cuda",
    num_workers: int = 0,
    work_dir: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``processes`` GPUs (one process each; ``device_type="cpu"``:
    CPU processes with the gloo backend) with ``batch_size`` volumes per process and step.

    ``model``, ``dataset`` and ``loss_fn`` are sent to the workers by pickling (spawn); the
    model ends on the CPU with rank 0's trained weights. ``work_dir`` holds the rendezvous file
    and rank 0's weights while the workers run (default: the system's temp folder).

    Raises:
        TrainingError: more GPUs asked for than exist, or a worker failed (its error is named).
    """
    import torch.multiprocessing as mp

    check_gpus(processes, device_type)
    model.cpu()
    with tempfile.TemporaryDirectory(prefix="ddp-", dir=work_dir) as tmp:
        job = _Job(model, dataset, loop, loss_fn, batch_size, seed, processes, device_type, num_workers,
                   str(Path(tmp) / "rendezvous"), tmp, cudnn_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_precision=torch.get_float32_matmul_precision())
        try:
            mp.start_processes(_worker, args=(job,), nprocs=processes, join=True, start_method="spawn")
        except mp.ProcessRaisedException as exc:
            last = [line for line in str(exc).strip().splitlines() if line.strip()][-1]
            raise TrainingError(f"distributed training failed in a worker process: {last}") from exc
        except mp.ProcessExitedException as exc:
            raise TrainingError(f"a distributed training worker died: {exc}") from exc
        state: Mapping[str, Any] = torch.load(Path(tmp) / "local.pt", weights_only=True)
        summary = json.loads((Path(tmp) / "result.json").read_text())
    model.load_state_dict(dict(state))
    return TrainResult(epoch_losses=list(summary["epoch_losses"]), steps=int(summary["steps"]),
                       volumes=int(summary["volumes"]), seconds=float(summary["seconds"]), optimizer_state={})
