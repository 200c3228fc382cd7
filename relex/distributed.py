"""One run across several processes: ``torchrun`` (or any launcher that sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) starts the same command on every GPU or CPU slot of one or
more hosts, and the ranks split the run's tensors.

Each rank takes a contiguous share of the tensors in storage order, balanced by bytes (:func:`shares`), so
its reads of each file stay sequential; it reads only those, computes on its own device and writes its own
shard files. The ranks meet only at *sync points* (:meth:`Ranks.step`, :meth:`Ranks.gather`): each runs a
phase of local work with no collective inside, catches what the phase raises, then every rank exchanges its
outcome in one ``all_gather``. A failure on any rank is raised on every rank at the same sync point, so no
rank waits for one that gave up; a rank that dies outright is reported by the launcher (which stops the
others), and the process group's timeout (``RELEX_DIST_TIMEOUT`` seconds, default 1800) ends any wait left.

Splitting is explicit: :func:`join` (which the command line calls under a launcher) makes the engine's calls
split their run across the ranks (:func:`current`); a process group created for something else leaves relex
in the calling process. Collectives use NCCL when the run computes on CUDA and gloo on the CPU; the sync
points exchange small Python objects (T × T Gram matrices, per-tensor figures, shard lists) through a gloo
group either way.
"""

from __future__ import annotations

import errno
import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from relex.errors import RelexInputError

__all__ = ["Ranks", "SINGLE", "current", "join", "leave", "shares"]

DEFAULT_TIMEOUT = 1800  # seconds a sync point waits for the slowest rank
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


@dataclass(frozen=True)
class Failure:
    """What one rank raised at a sync point, in a form every other rank can raise again."""

    rank: int
    input_error: bool  # a RelexInputError (exit 2), else an internal error (exit 1)
    problem: str
    path: str | None
    detail: str  # the traceback of an internal error

    def exception(self, world: int) -> Exception:
        where = f"rank {self.rank} of {world}"
        if self.input_error:
            return RelexInputError(f"{self.problem} (seen by {where})", self.path)
        return RuntimeError(f"{where} failed: {self.problem}\n{self.detail}")


def _failure(rank: int, exc: BaseException) -> Failure:
    if isinstance(exc, RelexInputError):
        return Failure(rank, True, exc.problem, None if exc.path is None else str(exc.path), "")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Failure(rank, True, f"the output's disk is full ({exc.strerror}); nothing was written", exc.filename, "")
    return Failure(rank, False, f"{type(exc).__name__}: {exc}", None,
                   "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


class Ranks:
    """The processes of one run: this one's ``rank`` among ``world``, its ``local_rank`` on its host."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, group=None):
        self.rank, self.world, self.local_rank, self.group = rank, world, local_rank, group
        self.broken = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        """Rank 0: names the staging folder, writes the index, ``relex.json`` and reports, renames."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` for a CUDA run without an index."""
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def gather(self, work: Callable[[], T]) -> list[T]:
        """Run ``work`` here, then a sync point: every rank's result, in rank order. If any rank raised, every
        rank raises (the failing rank its own exception, the others the first failure's, naming its rank)."""
        if not self.distributed:
            return [work()]
        error: BaseException | None = None
        try:
            outcome = (None, work())
        except Exception as exc:  # noqa: BLE001 - reported to every rank at this sync point, then raised
            error = exc
            outcome = (_failure(self.rank, exc), None)
        gathered: list = [None] * self.world
        try:
            dist.all_gather_object(gathered, outcome, group=self.group)
        except BaseException:
            self.broken = True  # a rank died or timed out: the group cannot be waited on again
            raise
        failures = [failure for failure, _ in gathered if failure is not None]
        if error is not None:
            raise error
        if failures:
            raise failures[0].exception(self.world)
        return [payload for _, payload in gathered]

    def step(self, work: Callable[[], T]) -> T:
        """Run ``work`` here and wait until every rank ran its own; raise if any rank failed (as :meth:`gather`)."""
        if not self.distributed:
            return work()
        results: dict = {}

        def local() -> None:
            results["value"] = work()

        self.gather(local)
        return results["value"]

    def from_leader(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 alone and hand its result to every rank (a choice all ranks must share)."""
        return self.gather(lambda: work() if self.leader else None)[0]

    def progress(self, progress, own_bytes: int, total_bytes: int):
        """Rank 0's progress callback for the whole job, others none: rank 0's bytes (done and to do) scaled by
        the bytes of one read of the whole run (``total_bytes``) over those of its share (``own_bytes``). An
        estimate: shares are balanced by bytes, so the ranks move at about one pace."""
        if not self.distributed or progress is None:
            return progress
        if not self.leader:
            return None
        factor = total_bytes / own_bytes if own_bytes else 1.0

        def scaled(name: str, done: int, total: int) -> None:
            whole = round(total * factor)
            progress(name, min(round(done * factor), whole), whole)

        return scaled


SINGLE = Ranks()
_joined: tuple[object, Ranks, bool] | None = None  # (the default group, its Ranks, whether relex created it)


def current() -> Ranks:
    """The ranks the engine splits a run across: those :func:`join` joined, else this process alone.

    Joining is explicit (the command line joins under a launcher): a process group set up for something else
    — a training job whose rank 0 calls relex, say — leaves relex in that one process.
    """
    if _joined is not None and dist.is_initialized() and _joined[0] is dist.group.WORLD:
        return _joined[1]
    return SINGLE


def _timeout() -> timedelta:
    text = os.environ.get("RELEX_DIST_TIMEOUT", str(DEFAULT_TIMEOUT))
    try:
        seconds = float(text)
    except ValueError:
        raise RelexInputError(f"RELEX_DIST_TIMEOUT must be a number of seconds, got {text!r}") from None
    return timedelta(seconds=seconds)


def join(device: str = "auto") -> Ranks:
    """Split the runs this process works on across the ranks of an initialised ``torch.distributed`` process
    group, or of a launcher's environment (``WORLD_SIZE`` > 1; the group is created here: NCCL for a CUDA
    ``device`` — ``auto`` on a machine with CUDA — else gloo); without either, this process works alone.
    Every rank must call it, then make the same relex calls in the same order, then :func:`leave`."""
    global _joined
    if dist.is_available() and dist.is_initialized():
        world_group = dist.group.WORLD
        if _joined is not None and _joined[0] is world_group:
            return _joined[1]
        world = dist.get_world_size()
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank))
        objects = None
        if world > 1 and dist.get_backend() != "gloo":
            objects = dist.new_group(backend="gloo", timeout=_timeout())  # small objects travel on the CPU
        _joined = (world_group, Ranks(rank, world, local, objects), False)
        return _joined[1]
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    missing = [name for name in LAUNCH_VARIABLES if not os.environ.get(name)]
    if missing:
        raise RelexInputError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun")
    if not dist.is_available():
        raise RelexInputError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=_timeout())
    join()
    assert _joined is not None
    _joined = (_joined[0], _joined[1], True)
    return _joined[1]


def leave() -> None:
    """Wait for every rank, then destroy the process group :func:`join` created (a group the caller
    initialised is left to it)."""
    global _joined
    try:
        if _joined is not None and _joined[2] and dist.is_initialized():
            try:
                if not _joined[1].broken:
                    dist.barrier(group=_joined[1].group)
            finally:
                dist.destroy_process_group()
    finally:
        _joined = None


def shares(sizes: Sequence[int], world: int) -> list[range]:
    """Contiguous index ranges, one per rank, splitting items of ``sizes`` bytes into about equal bytes: an item
    goes to the rank whose equal slice of the total holds its middle byte."""
    total = sum(sizes)
    owner = []
    position = 0
    for size in sizes:
        middle = position + size / 2
        owner.append(min(world - 1, int(middle * world / total)) if total else 0)
        position += size
    return [range(owner.index(r), len(owner) - owner[::-1].index(r)) if r in owner else range(0, 0)
            for r in range(world)]
