"""torch.distributed helpers: process group from the environment (torchrun / SLURM), small collectives.

Every helper is a no-op (or the identity) in a single process, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank within its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that writes files)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM host list -> host names: 'gpu[01-03,07],cpu1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu1']."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
            else:
                hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    return hosts


def slurm_env() -> dict[str, str]:
    """torch env:// variables derived from a SLURM step with several tasks (one task per GPU).

    Used when WORLD_SIZE is absent, e.g. the Hydra submitit launcher with tasks_per_node > 1;
    `srun torchrun ...` needs none of this (torchrun sets the variables). Empty when not applicable.
    """
    # SLURM_STEP_NUM_TASKS (set inside srun steps, as submitit uses) rather than SLURM_NTASKS: a plain
    # `python ...` in an sbatch script with --ntasks=4 is one process and must not wait for 3 others
    ntasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "WORLD_SIZE" in os.environ or ntasks <= 1 or "SLURM_PROCID" not in os.environ:
        return {}
    if os.environ.get("AVS_SLURM_DDP", "1") == "0":
        return {}
    hosts = expand_nodelist(os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
    return {
        "RANK": os.environ["SLURM_PROCID"],
        "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR", hosts[0] if hosts else "127.0.0.1"),
        "MASTER_PORT": os.environ.get("MASTER_PORT", str(20000 + job % 20000)),
    }


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (or derived from a multi-task SLURM step); 1 when absent."""
    if "WORLD_SIZE" not in os.environ:
        return int(slurm_env().get("WORLD_SIZE", "1"))
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    """Rank / world size of the current process group (single process when none)."""
    if not is_initialized():
        return DistInfo(0, 1, 0)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0))


def default_backend() -> str:
    """AVS_DIST_BACKEND if set; else gloo for CPU tensors plus NCCL for CUDA tensors when CUDA is present."""
    env = os.environ.get("AVS_DIST_BACKEND")
    if env:
        return env
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_from_env(timeout_s: float = 1800.0) -> DistInfo:
    """Create the default process group from torchrun's env:// variables when WORLD_SIZE > 1.

    Needs RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: torchrun sets them; in a SLURM step with
    several tasks they are derived from SLURM_* (`slurm_env`). On CUDA machines each process first
    selects cuda:LOCAL_RANK. Idempotent.
    """
    if is_initialized() or env_world_size() <= 1:
        return info()
    os.environ.update(slurm_env())
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} not set: launch with "
            "`torchrun --nproc_per_node=N scripts/train.py ...` (docs/distributed.md)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    backend = default_backend()
    dist.init_process_group(backend=backend, init_method="env://", timeout=_dt.timedelta(seconds=timeout_s))
    me = info()
    log.info("process group: backend %s, rank %d of %d (local rank %d)", backend, me.rank, me.world_size, me.local_rank)
    return me


def cleanup() -> None:
    """Destroy the default process group if one exists."""
    if is_initialized():
        dist.destroy_process_group()


def _coll_device() -> torch.device:
    """Device for small control tensors: CUDA only under a pure NCCL group, else CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_true(flag: bool) -> bool:
    """True if `flag` is True on any rank (all ranks get the same answer)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_coll_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def any_flags(flags: torch.Tensor) -> list[bool]:
    """Each entry of the 0/1 tensor `flags` [K] OR-ed over the ranks: one all_reduce, one host read.

    The tensor stays on its device when the group's backend takes it (NCCL: CUDA, gloo: CPU); the
    answer is read as one packed integer (a single `.item()`). K <= 31.
    """
    flags = flags.to(torch.int32).reshape(-1)
    if is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        if backend in ("nccl", "gloo"):
            flags = flags.to(_coll_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    weights = 2 ** torch.arange(flags.numel(), device=flags.device, dtype=torch.int32)
    code = int((flags.clamp(0, 1) * weights).sum())  # the one host read
    return [bool(code >> i & 1) for i in range(flags.numel())]


def all_true(flag: bool) -> bool:
    """True if `flag` is True on every rank."""
    return not any_true(not flag)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src`, on every rank (pickled through the process group; our own processes only)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_coll_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in a single process)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank, in place."""
    if not is_initialized() or dist.get_world_size() == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank, in place."""
    if not is_initialized() or dist.get_world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


def hydra_overrides(argv: list[str], config_dir: str | os.PathLike) -> list[str]:
    """Extra Hydra overrides so that every rank of a torchrun job uses one run / sweep dir (empty in one process).

    Hydra names run dirs after `${now:...}`, which differs between processes started a second
    apart: rank 0's clock is broadcast and substituted into the configured pattern
    (`<config_dir>/hydra/default.yaml`, or the `hydra.run.dir=` / `hydra.sweep.dir=` given in
    `argv`). Ranks > 0 write no `.hydra/` files and log to stdout only. Initialises the process
    group. Used by scripts/train.py before `hydra.main` runs.
    """
    if env_world_size() <= 1:
        return []
    from omegaconf import OmegaConf

    me = init_from_env()
    stamp = _dt.datetime.fromtimestamp(broadcast_object(_dt.datetime.now().timestamp()))
    defaults = OmegaConf.load(os.path.join(os.fspath(config_dir), "hydra", "default.yaml"))
    extra = []
    for key, node in (("hydra.run.dir", "run"), ("hydra.sweep.dir", "sweep")):
        given = [a.split("=", 1)[1] for a in argv if a.startswith(key + "=")]
        pattern = given[-1] if given else str(OmegaConf.to_container(defaults, resolve=False)[node]["dir"])
        fixed = re.sub(r"[$][{]now:([^}]*)[}]", lambda m: stamp.strftime(m.group(1)), pattern)
        extra.append(f"{key}={fixed}")
    if me.rank > 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return extra
