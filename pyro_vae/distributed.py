"""Data-parallel training on PyTorch's own engine: the processes that ``torchrun`` starts train
one model, with :class:`~torch.nn.parallel.DistributedDataParallel` (DDP) around its loss.

``torchrun --nproc-per-node N -m pyro_vae train ...`` starts N processes (ranks) and gives each
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. :func:`process_group` joins them into one process
group: Gloo on CPUs, NCCL on GPUs, one GPU per rank (that of its ``LOCAL_RANK``). With one
process (no ``torchrun``, or ``--nproc-per-node 1``) nothing here takes part, and training is
the single-process code, draw for draw. In a group of W ranks :func:`~pyro_vae.train.fit`
trains one model through a :class:`DataParallel`:

- ``config.batch_size`` is the global batch. At each step every rank takes
  ``batch_size / W`` rows (W must divide it) of its shard of the epoch, which
  :class:`~torch.utils.data.DistributedSampler` deals out from one permutation reshuffled
  every epoch (``set_epoch``); the rows of one step of all ranks are one chunk of that
  permutation. When W does not divide the training set, the sampler repeats up to W - 1 rows
  to give every rank as many.
- The draws of a step (dynamic binarization, the guide's samples) come from the global
  generator seeded with :func:`step_seed` of the run's seed, the step and the rank: ranks draw
  independently, and a resumed or restarted run draws again what it drew, with no random
  state saved.
- The loss is minus the ELBO summed over the rank's rows. DDP averages gradients over the
  ranks, so the loss is multiplied by W before ``backward``: the gradient is that of the sum
  over the global batch, as in one process.
- Metrics are sums and counts, all-reduced over the ranks, so every rank gets the same row
  (and takes the same early-stopping and learning-rate decisions). Each rank evaluates every
  W-th row of the validation and test sets.
- Rank 0 alone writes the run folder; every rank reads the checkpoint it resumes from (on
  several machines, the run folder must be on a file system they share).

References:

[1] `PyTorch Distributed: Experiences on Accelerating Data Parallel Training`, Shen Li et al.
    (VLDB 2020).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TypeVar

import numpy as np
import pyro
import torch
import torch.distributed as dist
from pyro import poutine
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from pyro_vae.config import Config
from pyro_vae.data import bernoulli_draw
from pyro_vae.devices import fork_rng, resolve_device
from pyro_vae.objectives import get_elbo
from pyro_vae.vae import VAE

T = TypeVar("T")

#: The process-group backend of each device type: Gloo on CPUs, NCCL on CUDA GPUs.
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


class WorldSizeError(ValueError):
    """A number of processes that does not fit the run: it does not divide the global batch
    ``config.batch_size`` (of a new run, or of the run being resumed)."""


def world_size() -> int:
    """The number of processes of the process group this one has joined; 1 outside a group."""
    return dist.get_world_size() if _joined() else 1


def rank() -> int:
    """This process's rank: in its process group, else the ``RANK`` torchrun gave it (0 for a
    process that torchrun did not start)."""
    return dist.get_rank() if _joined() else int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process is rank 0: the one that writes files and prints."""
    return rank() == 0


def launched_world_size() -> int:
    """The processes of this job: those of the joined group, else ``WORLD_SIZE`` as torchrun
    set it (1 for a process that torchrun did not start)."""
    return world_size() if _joined() else int(os.environ.get("WORLD_SIZE", "1"))


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_device(name: str | torch.device) -> torch.device:
    """The device this process trains on for the device name ``name`` (``config.device``).

    In a job of one process it is :func:`~pyro_vae.devices.resolve_device`'s. With several,
    each process takes a GPU of its own: ``auto`` (with CUDA) and ``cuda`` mean
    ``cuda:LOCAL_RANK``.

    :raises ValueError: for ``cuda:N`` in a job of several processes, for more processes on
        this machine than it has GPUs, and as :func:`~pyro_vae.devices.resolve_device` does.
    """
    size = launched_world_size()
    if size > 1 and str(name) not in ("auto", "cpu", "cuda"):
        raise ValueError(
            f"device {str(name)!r} names one GPU, but each of the {size} processes of this job "
            "takes the GPU of its LOCAL_RANK; use device 'cuda', 'auto' or 'cpu'"
        )
    device = resolve_device(name)
    if size == 1 or device.type != "cuda":
        return device
    local_rank, count = int(os.environ.get("LOCAL_RANK", rank())), torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"this machine has {count} CUDA device(s) but runs process LOCAL_RANK {local_rank} "
            f"of this job; start at most {count} per machine (torchrun --nproc-per-node) or "
            "use device 'cpu'"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device: str | torch.device = "auto") -> Iterator[torch.device]:
    """Run the block in the process group of the processes torchrun started, and yield this
    process's device (:func:`rank_device`).

    The group is joined (from torchrun's environment, with the backend of :data:`BACKENDS`)
    on entry and left on exit. In a job of one process, or in a group joined already (by the
    caller, with any backend), there is nothing to join or leave.

    >>> with process_group("cpu") as device:
    ...     device
    device(type='cpu')
    """
    device = rank_device(device)
    if _joined() or launched_world_size() == 1:
        yield device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    device_id = device if device.type == "cuda" else None
    dist.init_process_group(BACKENDS[device.type], device_id=device_id, **_attempt_store())
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _attempt_store() -> dict:
    """The rendezvous of :func:`dist.init_process_group` in a store of this restart attempt's
    own keys, where torchrun shares its store with the processes it starts.

    That store outlives a restart (``--max-restarts``), and the keys a process group writes in
    it (each rank's address) are not prefixed by the attempt: a rank of the restarted job could
    read the address of a process that is gone and fail to connect. Prefixing the keys by the
    restart count keeps each attempt to its own. Elsewhere, ``env://`` as usual (no options).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return {}
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(address, port, is_master=False, timeout=timedelta(minutes=10))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"pyro_vae/attempt_{attempt}", store)
    return {"store": prefixed, "rank": rank(), "world_size": launched_world_size()}


def barrier() -> None:
    """Wait until every process of the group gets here (nothing to wait for outside one)."""
    if world_size() > 1:
        dist.barrier()


def on_main_process(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` called on rank 0 only, and its result on every rank.

    An error of ``fn`` is raised on every rank, so that all of them stop, each with the same
    message, rather than wait for rank 0. The result is pickled and broadcast: keep it small.
    """
    if world_size() == 1:
        return fn(*args, **kwargs)
    outcome = [None, None]
    if rank() == 0:
        try:
            outcome[0] = fn(*args, **kwargs)
        except Exception as error:  # raised again below, on every rank
            outcome[1] = error
    dist.broadcast_object_list(outcome, src=0)
    result, error = outcome
    if error is not None:
        raise error
    return result


def main_process_first(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on every rank, on rank 0 first and on the others once it has
    succeeded: for a download that one process does for all. An error of rank 0's call is
    raised on every rank."""
    results = []
    on_main_process(lambda: results.append(fn(*args, **kwargs)))
    return results[0] if results else fn(*args, **kwargs)


def restarted() -> bool:
    """Whether torchrun restarted this job's processes after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def max_restarts() -> int:
    """The restarts torchrun allows this job (``--max-restarts``); 0 outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def job_id() -> str | None:
    """The id of this torchrun job (its rendezvous id, the same in every restart), or
    ``None`` for a process that torchrun did not start."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the draws of one training step on one rank: a hash of the run's seed, the
    global step and the rank (NumPy's :class:`~numpy.random.SeedSequence`).

    >>> step_seed(0, 5, 0) == step_seed(0, 5, 0) != step_seed(0, 5, 1)
    True
    """
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def record_world(config: Config) -> Config:
    """``config`` with the world size and backend of this process group in ``world_size`` and
    ``backend`` (``1`` and ``None`` for one process).

    :raises WorldSizeError: if the world size does not divide ``config.batch_size``; for a
        config that records another world size (a run resumed by another number of
        processes), the message says so.
    """
    size, batch_size = world_size(), config.batch_size
    if batch_size % size:
        if config.world_size not in (None, size):
            raise WorldSizeError(
                f"this run was trained by {config.world_size} process(es) with batch_size "
                f"{batch_size}, the global batch, which {size} processes cannot share evenly; "
                f"resume it with a number of processes that divides {batch_size}"
            )
        raise WorldSizeError(
            f"batch_size {batch_size} is the global batch, shared evenly by the {size} "
            f"processes of this job, but {size} does not divide it; set config.batch_size to a "
            f"multiple of {size} or start a number of processes that divides {batch_size}"
        )
    backend = dist.get_backend() if size > 1 else None
    return dataclasses.replace(config, world_size=size, backend=backend)


def check_resumed_world(checkpoint_config: dict) -> None:
    """Warn if the run of a checkpoint (whose ``config`` is ``checkpoint_config``) was trained
    by another number of processes than resumes it: the optimization is the same
    (``batch_size`` is the global batch), but the random draws are not."""
    size = world_size()
    recorded = checkpoint_config.get("world_size") if isinstance(checkpoint_config, dict) else None
    if recorded not in (None, size):
        warnings.warn(
            f"this run was trained by {recorded} process(es) and resumes with {size}: the same "
            "global batch but other random draws, so its numbers will differ from those of an "
            "uninterrupted run",
            stacklevel=3,
        )


class ELBOLoss(torch.nn.Module):
    """The module that DDP wraps: the VAE as its submodule (its parameters are those DDP
    synchronizes) and, as ``forward(x)``, the objective's loss of the batch ``x`` (minus the
    bound, summed over the batch).

    Pyro's own ``Trace_ELBO()(model, guide)`` would not do: for the VAE's bound methods it makes
    a module without parameters, which DDP refuses.
    """

    def __init__(self, vae: VAE, elbo: pyro.infer.ELBO):
        super().__init__()
        self.vae = vae
        self.elbo = elbo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.elbo.differentiable_loss(self.vae.model, self.vae.guide, x)


def check_parameters(vae: VAE, elbo: pyro.infer.ELBO, x: torch.Tensor) -> list[str]:
    """Run model and guide once on ``x`` and return the parameters of ``vae`` that the loss
    gives no gradient (DDP must then look for them at every step).

    Leaves the random state, the parameters and Pyro's parameter store as they were.

    :raises ValueError: naming a ``pyro.param`` of the model or guide that is not a parameter of
        ``vae``'s modules: DDP would leave it unsynchronized (and the optimizer, over
        ``vae.parameters()``, would not train it).
    """
    own = {id(p) for p in vae.parameters()}
    with fork_rng(x.device), pyro.get_param_store().scope(), pyro.validation_enabled(False):
        guide = poutine.trace(vae.guide).get_trace(x)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
        for name, site in (*guide.nodes.items(), *model.nodes.items()):
            if site["type"] == "param" and id(site["value"]) not in own:
                raise ValueError(
                    f"the model or guide of {type(vae).__name__} creates the parameter "
                    f"{name!r} with pyro.param outside its modules, which data-parallel "
                    "training cannot keep in step across processes; make it an "
                    "nn.Parameter of one of the VAE's modules"
                )
        elbo.differentiable_loss(vae.model, vae.guide, x).backward()
    unused = [n for n, p in vae.named_parameters() if p.requires_grad and p.grad is None]
    vae.zero_grad(set_to_none=True)
    return unused


class DataParallel:
    """One training run shared by the processes of the current process group (see the module
    docstring): what :func:`~pyro_vae.train.train_epoch` and
    :func:`~pyro_vae.train.evaluate_elbo` do differently there.

    Made by :func:`data_parallel` once the weights are in place (restored on resume): DDP
    then gives every rank those of rank 0.

    :param VAE vae: the model, on this process's device.
    :param Config config: the run's settings (``elbo``, ``num_particles``, ``seed``).
    :param torch.Tensor x: training rows, of which :func:`check_parameters` runs two.
    """

    def __init__(self, vae: VAE, config: Config, x: torch.Tensor):
        self.rank, self.world_size, self.seed = rank(), world_size(), config.seed
        elbo = get_elbo(config.elbo, config.num_particles)
        unused = check_parameters(vae, elbo, x[:2])
        self.module = DistributedDataParallel(
            ELBOLoss(vae, elbo),
            device_ids=[x.device] if x.device.type == "cuda" else None,
            find_unused_parameters=bool(unused),
        )

    def batches(
        self, x: torch.Tensor, batch_size: int, epoch: int, step: int, binarize: bool
    ) -> tuple[int, Iterator[torch.Tensor]]:
        """This rank's minibatches of epoch ``epoch`` of ``x``, from global step ``step`` on,
        and how many there are (the same on every rank).

        Each batch is drawn (binarized when ``binarize``) after seeding with
        :func:`step_seed`, and the loss of the batch draws on from there.
        """
        sampler = DistributedSampler(
            range(x.shape[0]), self.world_size, self.rank, shuffle=True, seed=self.seed
        )
        sampler.set_epoch(epoch)
        rows = torch.tensor(list(sampler), device=x.device).split(batch_size // self.world_size)
        return len(rows), self._draw(x, rows, step, binarize)

    def _draw(
        self, x: torch.Tensor, rows: tuple[torch.Tensor, ...], step: int, binarize: bool
    ) -> Iterator[torch.Tensor]:
        for i, chunk in enumerate(rows):
            torch.manual_seed(step_seed(self.seed, step + i, self.rank))
            yield bernoulli_draw(x[chunk]) if binarize else x[chunk]

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """The objective's loss of this rank's batch, through DDP."""
        return self.module(batch)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``, times the world size: DDP then averages the gradients into
        that of the global batch's loss."""
        (loss * self.world_size).backward()

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of data to evaluate: every ``world_size``-th row of ``x``."""
        return x[self.rank :: self.world_size]

    def sum(self, total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
        """The sum over all ranks of a scalar tensor ``total`` and of a count."""
        both = torch.stack([total.double(), total.new_tensor(count, dtype=torch.float64)])
        dist.all_reduce(both)
        return both[0].to(total.dtype), int(both[1].item())


def data_parallel(vae: VAE, config: Config, x: torch.Tensor) -> DataParallel | None:
    """The :class:`DataParallel` of a training run in a process group of several processes,
    ``None`` for one process.

    :raises ValueError: if torchrun started several processes but this one has joined no
        process group (each would train a model of its own): join one with
        :func:`process_group`.
    """
    if world_size() > 1:
        return DataParallel(vae, config, x)
    if launched_world_size() > 1:
        raise ValueError(
            f"this process is one of the {launched_world_size()} that torchrun started, but it "
            "has joined no process group, so each would train a model of its own; train "
            "inside pyro_vae.distributed.process_group(), or with train_run"
        )
    return None
