"""Run the training job across ``torchrun`` processes with DistributedDataParallel.

``torchrun`` tells each process who it is through environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). A plain ``encoder-service
train`` has none of them and runs as a world of one through the very same calls, which then
reduce to what training always did; so the training loop never branches on whether it is
distributed, and single-process training stays exactly what it was.

How the work is split, and why the result matches single-process training:

- Every rank builds the same feature matrix from the same data and seed: each pays for the
  build, but no shared file system or transfer of the matrix is needed; :meth:`World.require_same`
  refuses to train if they differ.
- Each epoch, a ``DistributedSampler`` gives every rank a disjoint shard of one seeded
  permutation, and each rank steps with ``batch_size / world_size`` rows. DDP averages the
  gradients, so every optimiser step sees one global batch of ``batch_size`` rows, as a single
  process does: the learning rate and the number of steps per epoch keep their meaning.
- Validation is sharded and its sums reduced, so every rank computes the same loss and takes the
  same early-stopping decision (a rank that stopped alone would leave the others waiting forever).
- Rank 0 alone logs, shows progress, exports the ONNX model and writes the manifest; the others
  wait for it and receive the artefacts in memory, so ranks on other machines can publish their
  slice of users without seeing rank 0's disk (:func:`publish_snapshot`).

The backend is gloo on CPU and nccl when CUDA is present (each rank then uses the GPU numbered
by its ``LOCAL_RANK``).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import redis
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from encoder_service.encoder import Encoder
from encoder_service.publish import (
    PublishReport,
    check_publishable,
    publish_version,
    register_snapshot,
    shard_bounds,
    write_snapshot,
)
from encoder_service.store import EmbeddingStore
from encoder_service.training.model import MultiGroupAutoencoder

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from encoder_service.training.pipeline import TrainedVersion

T = TypeVar("T")

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""Set by ``torchrun`` for every process it starts; all present means "launched by torchrun"."""

_BUFFERS_SYNCED_AT_START_ONLY: dict[str, Any] = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}  # its name before torch 2.13
)
"""The mean/std buffers are fixed before training: DDP need not re-send them every step."""

LossFn = Callable[[Tensor, Tensor | None, torch.Generator], tuple[Tensor, Tensor]]
"""A training step's forward: a batch, its item-set targets (or None) and the dropout generator
-> (loss, component losses)."""


class DistributedTrainingError(RuntimeError):
    """The ranks of one job disagree (different data) or one of them failed."""


@dataclass(frozen=True)
class World:
    """This process's place among the job's processes; ``World()`` is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    """``gloo`` or ``nccl`` when a process group is running, ``None`` for a single process."""

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this rank trains: its own GPU under nccl, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    # --- the training loop's hooks ----------------------------------------------------------

    def loss_fn(self, model: MultiGroupAutoencoder) -> LossFn:
        """The training step's forward; under DDP it goes through the wrapper, whose forward is
        what arms the gradient all-reduce of the following ``backward()``."""
        if not self.distributed:
            return lambda batch, items, generator: model.loss(batch, items, generator=generator)
        wrapped = DistributedDataParallel(
            _LossModule(model),
            device_ids=[self.local_rank] if self.backend == "nccl" else None,
            **_BUFFERS_SYNCED_AT_START_ONLY,
        )
        return lambda batch, items, generator: cast(
            tuple[Tensor, Tensor], wrapped(batch, items, generator)
        )

    def local_batch_size(self, batch_size: int) -> int:
        """Rows per rank and step so that one step of all ranks is one global batch."""
        return max(1, math.ceil(batch_size / self.size))

    def epoch_rows(self, n: int, epoch: int, seed: int, generator: torch.Generator) -> Tensor:
        """This rank's rows of ``n`` for ``epoch``, in training order.

        A single process draws one permutation from ``generator``, as training always has. Ranks
        take their shard of a permutation seeded by ``seed`` and ``epoch`` alone, so all ranks
        agree on it; each shard has the same length (a few rows repeat), so every rank runs the
        same number of steps, which DDP requires.
        """
        if not self.distributed:
            return torch.randperm(n, generator=generator)
        sampler: DistributedSampler[int] = DistributedSampler(
            cast(torch.utils.data.Dataset, range(n)),
            num_replicas=self.size,
            rank=self.rank,
            shuffle=True,
            seed=seed,
        )
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), dtype=torch.long)

    def shard(self, x: Tensor) -> Tensor:
        """This rank's contiguous share of ``x``'s rows (all of them for a single process)."""
        if not self.distributed:
            return x
        if len(x) < self.size:
            raise DistributedTrainingError(
                f"{len(x)} validation rows cannot be shared by {self.size} processes"
            )
        bounds = np.linspace(0, len(x), self.size + 1).round().astype(int)
        return x[bounds[self.rank] : bounds[self.rank + 1]]

    def mean(self, values: list[float], weight: float = 1.0) -> list[float]:
        """The ``weight``-weighted mean of ``values`` over all ranks (``values`` itself alone)."""
        if not self.distributed:
            return values
        sums = torch.tensor(
            [*(v * weight for v in values), weight], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(sums)
        total = sums.cpu().tolist()
        return [v / total[-1] for v in total[:-1]]

    def require_same(self, x: np.ndarray, what: str) -> None:
        """Refuse to go on unless every rank holds byte-identical ``x``."""
        if not self.distributed:
            return
        digest = hashlib.blake2b(np.ascontiguousarray(x).data, digest_size=7).digest()
        mine = int.from_bytes(digest, "little", signed=True)
        found = torch.tensor([mine, -mine], dtype=torch.int64, device=self.device)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        if found.tolist() != [mine, -mine]:
            raise DistributedTrainingError(
                f"the ranks built different {what}s: every rank must read the same data "
                "with the same ENCODER_SEED"
            )

    # --- coordination -----------------------------------------------------------------------

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only; every rank returns its result (sent as a pickle).

        When ``fn`` fails, rank 0 re-raises and the other ranks raise too instead of waiting.
        """
        if not self.distributed:
            return fn()
        box: list[object] = [None]
        failure: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:
                failure, box[0] = exc, ("failed", f"{type(exc).__name__}: {exc}")
        dist.broadcast_object_list(box, src=0, device=self.device)
        if failure is not None:
            raise failure
        status, value = cast(tuple[str, object], box[0])
        if status != "ok":
            raise DistributedTrainingError(f"rank 0 failed: {value}")
        return cast(T, value)

    def all_succeeded(self, ok: bool) -> bool:
        """True when every rank passed ``True``; a collective, so every rank must call it."""
        if not self.distributed:
            return ok
        flag = torch.tensor([int(ok)], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


class _LossModule(nn.Module):
    """The autoencoder's training loss as a ``forward``, which is what DDP wraps."""

    def __init__(self, model: MultiGroupAutoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batch: Tensor, items: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        return self.model.loss(batch, items, generator=generator)


def launched_by_torchrun(env: Mapping[str, str] = os.environ) -> bool:
    return all(name in env for name in TORCHRUN_VARIABLES)


def current() -> World:
    """The world this process belongs to: the running process group's, else a single process."""
    if not dist.is_available() or not dist.is_initialized():
        return World()
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
    )


@contextmanager
def launched(env: Mapping[str, str] = os.environ) -> Iterator[World]:
    """Join the torchrun job this process belongs to, if any, for the duration of the block.

    Ranks other than 0 log warnings and errors only, so a job prints one set of progress lines.
    """
    if not launched_by_torchrun(env) or dist.is_initialized():
        yield current()
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(env["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    world = current()
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    log.info(
        "distributed training: %d processes (%s), master %s:%s",
        *(world.size, backend, env["MASTER_ADDR"], env["MASTER_PORT"]),
    )
    try:
        yield world
    finally:
        dist.destroy_process_group()


def publish_snapshot(
    client: redis.Redis,
    trained: TrainedVersion,
    *,
    activate: bool | None,
    batch_size: int,
    progress: bool = True,
) -> PublishReport:
    """Publish the training snapshot, each rank encoding and writing its slice of the users.

    Rank 0 registers the version once every rank has written its slice (so readers never see a
    half-filled version), and removes the written keys instead when any rank failed. A single
    process publishes as it always has. Every rank returns rank 0's report.
    """
    world = current()
    if not world.distributed:
        return publish_version(
            client,
            trained.artifacts(),
            trained.user_ids,
            trained.states,
            features=trained.features,
            activate=activate,
            batch_size=batch_size,
            progress=progress,
        )
    artifacts = trained.artifacts()
    encoder = Encoder(artifacts)
    existing = check_publishable(client, artifacts)
    lo, hi = shard_bounds(len(trained.user_ids), world.size)[world.rank]
    started = time.perf_counter()
    try:
        write_snapshot(
            client,
            encoder,
            trained.user_ids[lo:hi],
            trained.states[lo:hi],
            features=trained.features[lo:hi],
            batch_size=batch_size,
            progress=progress and world.is_main,
        )
        ok = True
    except Exception:
        log.exception("rank %d failed to publish its %d users", world.rank, hi - lo)
        ok = False
    if not world.all_succeeded(ok):
        if existing is None:
            world.on_main(lambda: EmbeddingStore(client).delete_version(encoder.version))
        raise DistributedTrainingError(
            f"publishing {encoder.version} failed on at least one rank; nothing was registered"
        )
    return world.on_main(
        lambda: register_snapshot(
            client, artifacts, users=len(trained.user_ids), started=started, activate=activate
        )
    )
