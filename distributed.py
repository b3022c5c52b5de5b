"""Several processes, one training or one folder of inference: the few helpers train.py and infer.py use
under torchrun, PyTorch's own launcher.

    torchrun --nproc_per_node=4 train.py --data archive/patches --batch-size 16     # 4 GPUs, 4 images each
    torchrun --nproc_per_node=4 infer.py --checkpoint checkpoints/best_model.pth --input big/ --output masks/

torchrun (`python -m torch.distributed.run`) starts one process per device and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_env` reads them and joins the process group (NCCL on
GPUs, each rank on cuda:LOCAL_RANK; gloo on CPU). Without WORLD_SIZE nothing is set up and every helper acts
as for one process, so `python train.py` is unchanged. Rank 0 is the main process: it alone prints to stdout
and writes files; the other ranks' stdout prints are dropped and their stderr lines are prefixed with their
rank. One sharding rule everywhere (`shard`): rank r takes items r, r + world, r + 2 world, ... of a list
every rank builds identically.
"""

import builtins
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from model import resolve_device

# a collective that waits longer than this (a rank died or hangs outside torchrun, which would kill the others
# itself) raises instead of hanging for ever; figures and checkpoints on rank 0 take far less
TIMEOUT = datetime.timedelta(minutes=15)
_print = builtins.print


# --------------------------------------------------------------------------- the process group

@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, world size, local rank (its GPU on this machine) and its device."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def init_from_env(device="auto", timeout=TIMEOUT):
    """Join torchrun's process group (once; a second call returns the same Context) and return this process's
    Context. Outside torchrun (no WORLD_SIZE): one process, `device` resolved as --device says, no group.
    Under torchrun a CUDA device means NCCL and cuda:LOCAL_RANK, whatever index --device named; else gloo."""
    want = resolve_device(device)
    if "WORLD_SIZE" not in os.environ:
        return Context(device=want)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if want.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: no CUDA GPU is available here; use --device cpu (gloo) or auto")
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; "
                             f"start at most that many processes per node (--nproc_per_node)")
        want = torch.device("cuda", local)
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo", timeout=timeout)
        if rank != 0:
            builtins.print = _rank_print(rank)
    return Context(rank=rank, world=world, local_rank=local, device=want)


def _rank_print(rank):
    def rank_print(*args, file=None, **kwargs):
        if file is None or file is sys.stdout:
            return  # rank 0 tells the story
        _print(f"[rank {rank}]", *args, file=file, **kwargs)
    return rank_print


def cleanup():
    """Leave the process group (if any) and give print back; safe to call more than once."""
    builtins.print = _print
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    """Wait for every rank (nothing to wait for in one process)."""
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


# --------------------------------------------------------------------------- collectives

def all_reduce_sum(tensor):
    """The element-wise sum of `tensor` over the ranks, on `tensor`'s device and dtype (itself in one process).
    Exact for integer tensors (confusion matrices)."""
    if not dist.is_initialized():
        return tensor
    t = tensor.to(torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu")
    t = t.clone() if t is tensor else t
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(tensor.device)


def gather_objects(obj):
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sync_buffers(module):
    """Give every rank rank 0's buffers (BatchNorm running statistics): DDP averages gradients but each rank's
    forward updates its own running stats, so without this the ranks would validate slightly different models."""
    if dist.is_initialized():
        for b in module.buffers():
            dist.broadcast(b.data, src=0)


def reduce_epoch(loader, loss, cm, extra):
    """The whole epoch over all ranks from this rank's run_epoch results over `loader` (made by shard_loader):
    the confusion matrix summed (every image counted once), the mean loss and extra terms as sum over ranks of
    (mean x images) / all images. Unchanged in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return loss, cm, extra
    n = loader.count if hasattr(loader, "count") else loader.batch_sampler.count  # resident or DataLoader
    names = list(extra)
    sums = all_reduce_sum(torch.tensor([loss * n] + [extra[k] * n for k in names] + [n], dtype=torch.float64))
    total = max(float(sums[-1]), 1.0)
    cm.counts = all_reduce_sum(cm.counts)
    return float(sums[0]) / total, cm, {k: float(sums[i + 1]) / total for i, k in enumerate(names)}


# --------------------------------------------------------------------------- sharding

def shard(items, rank, world):
    """Rank `rank`'s part of `items`: items rank, rank + world, ... Over the ranks 0..world-1 the parts are
    disjoint and together hold every item once; every rank must pass the same list in the same order."""
    return list(items)[rank::world]


class RankBatches(Sampler):
    """This rank's share (`shard`) of each batch of a batch sampler, empty shares left out. Built on the
    single-process loader's own BatchSampler and generator, so the union of the ranks' batches is exactly the
    batch one process would draw with the same seed. `count`: images handed out in the last pass."""

    def __init__(self, batches, rank, world):
        self.batches, self.rank, self.world, self.count = batches, rank, world, 0

    def __iter__(self):
        self.count = 0
        for batch in self.batches:
            part = shard(batch, self.rank, self.world)
            if part:
                self.count += len(part)
                yield part

    def __len__(self):
        return len(self.batches)


def shard_loader(loader, ctx):
    """The DataLoader of this rank's share of `loader`'s batches: a global batch of B images becomes B / world
    images per rank (the same shuffle on every rank: the loader's generator is seeded alike). Validation
    loaders too, so each val image is scored exactly once over the ranks."""
    return DataLoader(loader.dataset, batch_sampler=RankBatches(loader.batch_sampler, ctx.rank, ctx.world),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      persistent_workers=loader.persistent_workers, generator=loader.generator)


# --------------------------------------------------------------------------- the model

class DDP(DistributedDataParallel):
    """DistributedDataParallel that also answers the wrapped model's own attributes (num_classes, model_args),
    so code written for the plain model runs on it. Checkpoints save `.module`, the plain model."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model, ctx):
    """The model for the training step: DDP across the ranks (gradients averaged), the model itself in one
    process."""
    if not dist.is_initialized():
        return model
    return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
