"""verl's FSDP checkpoints: per-rank shards reassembled one tensor at a time.

Layout written by verl's ``FSDPCheckpointManager`` (default settings) for a run of ``W`` processes::

    RUN/global_step_N/actor/
        model_world_size_W_rank_0.pt  …  model_world_size_W_rank_{W-1}.pt
        optim_world_size_W_rank_R.pt, extra_state_world_size_W_rank_R.pt   (not read here)
        fsdp_config.json       {"FSDP_version": 1 or 2, "world_size": W}
        huggingface/           config.json, generation_config.json, tokenizer files (no weights)

Each ``model_…_rank_R.pt`` is ``torch.save(model.state_dict())`` taken on rank ``R`` under
``StateDictType.SHARDED_STATE_DICT`` (FSDP1 over a device mesh) or with ``fully_shard`` (FSDP2). Its values
are ``DTensor``s whose local tensor is the rank's shard: placements ``(Shard(0),)`` on a 1-D ``("fsdp",)``
mesh, or ``(Replicate(), Shard(0))`` on a 2-D ``("ddp", "fsdp")`` mesh (hybrid sharding). Shards follow
``torch.chunk``: with uneven sizes the last ranks hold fewer rows, possibly none. ``DTensor.shape`` is
the global shape. FSDP1 without a device mesh stores ``ShardedTensor``s instead; those cannot be unpickled
outside the process group that wrote them, so they are refused.

:class:`FsdpSource` memory-maps every rank file (``torch.load(..., mmap=True)``), works out from the
metadata alone where each rank's shard sits in the full tensor, and on :meth:`FsdpSource.read` copies
only the overlapping shards into one fresh tensor. No pages are touched before a tensor is read, so
memory stays at the tensors being read.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from relex.errors import RelexInputError
from relex.io.source import Source, TensorInfo

_RANK_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")

# Module-path components that wrappers insert into parameter names: FSDP1 (``_fsdp_wrapped_module``),
# ``torch.compile`` (``_orig_mod``) and activation checkpointing (``_checkpoint_wrapped_module``).
# Dropping them gives the names of the Hugging Face model in ``huggingface/config.json``.
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module"})

_SHARDED_TENSOR = "torch.distributed._shard.sharded_tensor.api.ShardedTensor"


def is_fsdp_folder(folder: Path) -> bool:
    """True when ``folder`` holds verl's ``model_world_size_W_rank_R.pt`` files."""
    folder = Path(folder)
    return folder.is_dir() and any(_RANK_FILE.match(p.name) for p in folder.glob("model_world_size_*_rank_*.pt"))


def hf_name(name: str) -> str:
    """``name`` without the wrapper components FSDP1, ``torch.compile`` and checkpointing insert."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def allowed_globals() -> list:
    """The classes a verl rank file pickles besides plain tensors, allowed for ``weights_only`` loading.

    These are the DTensor metadata classes (tensor, spec, mesh, placements). ``Partial`` and
    ``_StridedShard`` are never written by plain FSDP but are allowed so that such a file is refused with
    a message naming its placement rather than as an unreadable pickle.
    """
    import torch.distributed.tensor  # noqa: F401 - defines DTensor (and registers it with torch)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, _dtensor_spec, placement_types

    classes = [
        DTensor,
        _dtensor_spec.DTensorSpec,
        _dtensor_spec.TensorMeta,
        DeviceMesh,
        placement_types.Shard,
        placement_types.Replicate,
        placement_types.Partial,
        placement_types._StridedShard,
    ]
    # Newer torch versions also pickle the shard order of the spec and the mesh's layout; older ones
    # do not have these classes.
    classes.append(getattr(_dtensor_spec, "ShardOrderEntry", None))
    try:
        from torch.distributed import _mesh_layout

        classes += [getattr(_mesh_layout, "_MeshLayout", None), getattr(_mesh_layout, "_FlatLayout", None)]
    except ImportError:
        pass
    return [c for c in classes if c is not None]


@contextmanager
def _allowing(classes: list):
    """Allow ``classes`` for ``weights_only`` loads inside the block, then restore the allow-list exactly.

    ``torch.serialization.safe_globals`` is not used: on exit it removes every class it was given, even
    those torch registered itself (importing ``torch.distributed.tensor`` registers the DTensor classes),
    which would break later ``weights_only`` loads of DTensors elsewhere in the process.
    """
    saved = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals(classes)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


@contextmanager
def _quiet_device_mesh():
    # Unpickling a DeviceMesh outside its process group logs a warning about torch.compile that does
    # not apply to reading weights; it would break the one-line error output of the CLI.
    logger = logging.getLogger("torch.distributed.device_mesh")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_rank_file(path: Path, allow_pickle: bool = False) -> Mapping:
    """The state dict in one rank file, memory-mapped, loaded with ``weights_only`` when possible.

    Falls back to an unrestricted pickle only when ``allow_pickle`` is set and the file references
    classes outside :func:`allowed_globals`; ``ShardedTensor`` files are refused either way.
    """
    try:
        import torch.distributed.tensor  # noqa: F401 - DTensor must be importable to unpickle shards
    except ImportError:
        raise RelexInputError("this torch build has no torch.distributed, needed to read FSDP shards",
                              path) from None
    globals_ = allowed_globals()
    try:
        with _quiet_device_mesh(), _allowing(globals_):
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refused something: find out whether the file references other classes (then it
        # needs an unrestricted pickle) or is simply corrupt.
        try:
            with _allowing(globals_):
                unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - a file the scanner cannot parse is corrupt
            unsafe = []
        if not unsafe:
            raise RelexInputError(f"corrupt rank file ({_first_line(exc)})", path) from None
        if _SHARDED_TENSOR in unsafe:
            raise RelexInputError(
                "holds ShardedTensor values (FSDP1 without a device mesh), which cannot be loaded outside "
                "the process group that saved them; save with a device mesh or merge to safetensors first",
                path,
            )
        if not allow_pickle:
            shown = ", ".join(unsafe[:3]) + (", …" if len(unsafe) > 3 else "")
            raise RelexInputError(
                f"needs an unrestricted pickle to load (it references {shown}); pickles can run code when "
                "loaded, so relex refuses them unless you pass --allow-pickle",
                path,
            )
        try:
            with _quiet_device_mesh():
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - any load failure is the file's fault
            raise RelexInputError(f"cannot load rank file ({_first_line(exc2)})", path) from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad magic, I/O error: the file's fault
        raise RelexInputError(f"corrupt or truncated rank file ({_first_line(exc)})", path) from None
    if not isinstance(state, Mapping):
        raise RelexInputError(f"not a state dict (holds a {type(state).__name__})", path)
    return state


def rank_files(folder: Path) -> tuple[int, list[Path]]:
    """``(world size, [rank file of rank 0, …, rank W-1])`` of an FSDP actor folder, checked complete."""
    found: dict[int, Path] = {}
    sizes: dict[int, Path] = {}
    for path in sorted(Path(folder).glob("model_world_size_*_rank_*.pt")):
        match = _RANK_FILE.match(path.name)
        if match is None:
            continue
        world, rank = int(match.group(1)), int(match.group(2))
        sizes.setdefault(world, path)
        found[rank] = path
    if not sizes:
        raise RelexInputError("no FSDP rank files (model_world_size_W_rank_R.pt) found", folder)
    if len(sizes) > 1:
        a, b = sorted(sizes)[:2]
        raise RelexInputError(f"rank files of two world sizes ({a} and {b}) in one folder", folder)
    (world,) = sizes
    for rank in sorted(found):
        if rank >= world:
            raise RelexInputError(f"rank {rank} is outside world size {world}", found[rank])
    for rank in range(world):
        if rank not in found:
            raise RelexInputError(f"missing shard of rank {rank} (world size {world})", folder)
    return world, [found[r] for r in range(world)]


@dataclass(frozen=True)
class _Piece:
    """One rank's shard: indices ``start:stop`` of the full tensor along the layout's dimension."""

    rank: int
    start: int
    stop: int


@dataclass(frozen=True)
class _Layout:
    """Where a tensor's data lives: ``dim`` is the sharded dimension, ``None`` when one rank holds it all."""

    dim: int | None
    pieces: tuple[_Piece, ...]


class FsdpSource(Source):
    """A verl FSDP actor folder (``…/global_step_N/actor``) read as one unsharded checkpoint.

    ``tensors`` gives full shapes and the stored dtypes under Hugging Face names; ``TensorInfo.file`` is
    the rank-0 file and ``offset`` the position in the state dict. :meth:`read` reassembles a tensor (or
    rows of it) from the ranks' local shards without any process group.
    """

    kind = "fsdp"

    def __init__(self, folder: str | Path, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise RelexInputError("FSDP checkpoint folder does not exist", self.folder)
        self.world_size, self.files = rank_files(self.folder)
        self.fsdp_version = self._read_fsdp_config()
        # Memory-mapped: loading reads only the pickled metadata; shard bytes stay on disk until read.
        states = [self._renamed(load_rank_file(f, allow_pickle), f) for f in self.files]
        names = list(states[0])
        for rank, state in enumerate(states[1:], start=1):
            if set(state) != set(names):
                extra = sorted(set(state) ^ set(names))[0]
                raise RelexInputError(
                    f"tensor names differ from rank 0's (e.g. {extra!r} is only in one of them)", self.files[rank]
                )
        self.tensors: dict[str, TensorInfo] = {}
        self._layouts: dict[str, _Layout] = {}
        self._locals: dict[str, dict[int, torch.Tensor]] = {}
        self.mesh_shape: tuple[int, ...] | None = None
        self.mesh_dim_names: tuple[str, ...] | None = None
        for position, name in enumerate(names):
            values = [state[name] for state in states]
            shape, dtype, layout, mesh = self._layout(name, values)
            self.tensors[name] = TensorInfo(name, shape, dtype, self.files[0], position)
            self._layouts[name] = layout
            self._locals[name] = {p.rank: _local(values[p.rank]) for p in layout.pieces}
            if mesh is not None and self.mesh_shape is None:
                self.mesh_shape = tuple(mesh.mesh.shape)
                self.mesh_dim_names = mesh.mesh_dim_names
        if not self.tensors:
            raise RelexInputError("rank files hold no tensors", self.files[0])

    # -- opening -----------------------------------------------------------------------------------
    def _read_fsdp_config(self) -> int | None:
        """FSDP version from ``fsdp_config.json`` (optional); its world size must match the files."""
        path = self.folder / "fsdp_config.json"
        if not path.is_file():
            return None
        try:
            config = json.loads(path.read_text())
            version, world = config.get("FSDP_version"), config.get("world_size")
            version, world = (None if v is None else int(v) for v in (version, world))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise RelexInputError(f"cannot read FSDP config ({type(exc).__name__})", path) from None
        if world is not None and world != self.world_size:
            raise RelexInputError(f"world_size is {world} but the rank files say {self.world_size}", path)
        return version

    @staticmethod
    def _renamed(state: Mapping, path: Path) -> dict:
        renamed = {}
        for key, value in state.items():
            if not isinstance(key, str):
                raise RelexInputError(f"state dict key {key!r} is not a string", path)
            name = hf_name(key)
            if name in renamed:
                raise RelexInputError(f"two tensors are named {name!r} once wrapper prefixes are removed", path)
            if not isinstance(value, torch.Tensor):
                raise RelexInputError(f"{key!r} holds a {type(value).__name__}, not a tensor", path)
            renamed[name] = value
        return renamed

    def _layout(self, name: str, values: list[torch.Tensor]):
        """``(full shape, dtype, layout, device mesh or None)`` of one tensor, from metadata only."""
        from torch.distributed.tensor import DTensor

        first = values[0]
        kinds = {isinstance(v, DTensor) for v in values}
        if len(kinds) > 1:
            raise RelexInputError(f"tensor {name!r} is a DTensor on some ranks only", self.folder)
        for rank, value in enumerate(values):
            if tuple(value.shape) != tuple(first.shape) or value.dtype != first.dtype:
                raise RelexInputError(
                    f"tensor {name!r} has shape {list(value.shape)} {value.dtype} on rank {rank} but "
                    f"{list(first.shape)} {first.dtype} on rank 0",
                    self.files[rank],
                )
        shape, dtype = tuple(first.shape), first.dtype
        if type(first).__name__ == "ShardedTensor":
            # Reachable only through an unrestricted pickle loaded inside a process group.
            raise RelexInputError(f"tensor {name!r} is a ShardedTensor, which relex cannot read", self.files[0])
        if not isinstance(first, DTensor):
            # A plain tensor in a sharded state dict is replicated (every rank holds all of it).
            return shape, dtype, _Layout(None, (_Piece(0, 0, shape[0] if shape else 0),)), None
        return (shape, dtype, *self._dtensor_layout(name, values))

    def _dtensor_layout(self, name: str, values: list) -> tuple[_Layout, object]:
        from torch.distributed.tensor import Replicate, Shard

        first = values[0]
        placements = tuple(first.placements)
        for rank, value in enumerate(values):
            if tuple(value.placements) != placements:
                raise RelexInputError(
                    f"tensor {name!r} has placements {value.placements} on rank {rank} but {placements} on rank 0",
                    self.files[rank],
                )
        # Exact types: _StridedShard (FSDP + tensor parallel) and Partial need more than concatenation.
        unsupported = [p for p in placements if type(p) not in (Shard, Replicate)]
        sharded = [i for i, p in enumerate(placements) if type(p) is Shard]
        if unsupported or len(sharded) > 1:
            raise RelexInputError(
                f"tensor {name!r} has placements {placements}; relex reads FSDP shards (one Shard mesh "
                "dimension, others Replicate) only",
                self.files[0],
            )
        # The mesh seen from rank 0 (for a sub-mesh, the one holding rank 0): which global rank sits at
        # each mesh coordinate. Replicated mesh dimensions are read at coordinate 0.
        device_mesh = first.device_mesh
        grid = device_mesh.mesh
        if grid.ndim != len(placements):
            raise RelexInputError(f"tensor {name!r} has a mesh of shape {list(grid.shape)} for "
                                  f"{len(placements)} placements", self.files[0])
        for rank in grid.flatten().tolist():
            if not 0 <= rank < self.world_size:
                raise RelexInputError(f"tensor {name!r} is sharded over rank {rank}, outside world size "
                                      f"{self.world_size}", self.files[0])
        shape = tuple(first.shape)
        if not sharded:
            rank = int(grid[(0,) * grid.ndim])
            self._check_local(name, values[rank], shape, None, rank)
            return _Layout(None, (_Piece(rank, 0, shape[0] if shape else 0),)), device_mesh
        mesh_dim = sharded[0]
        dim = placements[mesh_dim].dim
        if not 0 <= dim < len(shape):
            raise RelexInputError(f"tensor {name!r} is sharded on dim {dim} of a {len(shape)}-D tensor",
                                  self.files[0])
        # Shard sizes come from the local tensors themselves (not recomputed from torch.chunk), so any
        # split along ``dim`` is read correctly as long as the pieces add up to the full size.
        pieces, start = [], 0
        for k in range(grid.shape[mesh_dim]):
            index = [0] * grid.ndim
            index[mesh_dim] = k
            rank = int(grid[tuple(index)])
            self._check_local(name, values[rank], shape, dim, rank)
            local = _local(values[rank])
            pieces.append(_Piece(rank, start, start + local.shape[dim]))
            start += local.shape[dim]
        if start != shape[dim]:
            raise RelexInputError(
                f"shards of tensor {name!r} hold {start} of its {shape[dim]} entries along dim {dim}",
                self.files[pieces[-1].rank],
            )
        return _Layout(dim, tuple(pieces)), device_mesh

    def _check_local(self, name: str, value, shape: tuple[int, ...], dim: int | None, rank: int) -> None:
        """The local shard must match the full ``shape`` in every dimension but the sharded ``dim``."""
        local = _local(value)
        same = local.ndim == len(shape) and all(
            n == m for d, (n, m) in enumerate(zip(local.shape, shape)) if d != dim
        )
        if not same or local.dtype != value.dtype:
            raise RelexInputError(
                f"local shard of tensor {name!r} has shape {list(local.shape)} {local.dtype}, which does not "
                f"fit the full shape {list(shape)} {value.dtype}",
                self.files[rank],
            )

    # -- reading -----------------------------------------------------------------------------------
    @property
    def config_folder(self) -> Path:
        """``huggingface/`` beside the rank files (config and tokenizer), else the folder itself."""
        hf = self.folder / "huggingface"
        return hf if hf.is_dir() else self.folder

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (rows ``start:stop`` of dim 0 when given) in its stored dtype, on the CPU.

        The result is a fresh contiguous tensor assembled from the shards that overlap the rows asked
        for; other ranks' shards are not touched.
        """
        info = self.tensors[name]
        layout = self._layouts[name]
        locals_ = self._locals[name]
        shape = list(info.shape)
        lo, hi = 0, shape[0] if shape else 0
        if shape and (start is not None or stop is not None):
            lo = max(0, start or 0)
            hi = max(lo, min(shape[0], shape[0] if stop is None else stop))
            shape[0] = hi - lo
        out = torch.empty(shape, dtype=info.dtype)
        if layout.dim is None:
            local = locals_[layout.pieces[0].rank]
            out.copy_(local[lo:hi] if info.shape else local)
        elif layout.dim == 0:
            for piece in layout.pieces:
                a, b = max(lo, piece.start), min(hi, piece.stop)
                if a < b:
                    out[a - lo:b - lo].copy_(locals_[piece.rank][a - piece.start:b - piece.start])
        else:
            for piece in layout.pieces:
                if piece.stop > piece.start:
                    out.narrow(layout.dim, piece.start, piece.stop - piece.start).copy_(locals_[piece.rank][lo:hi])
        return out

    def describe(self) -> dict:
        """What ``relex.json`` records: kind, folder, world size, FSDP version and device mesh."""
        return {
            "kind": self.kind,
            "folder": str(self.folder),
            "world_size": self.world_size,
            "fsdp_version": self.fsdp_version,
            "mesh_shape": None if self.mesh_shape is None else list(self.mesh_shape),
            "mesh_dim_names": None if self.mesh_dim_names is None else list(self.mesh_dim_names),
        }

    def close(self) -> None:
        """Drop the memory maps of the rank files."""
        self._locals.clear()


def _local(value: torch.Tensor) -> torch.Tensor:
    """The rank's own data of a DTensor (read directly: there is no process group), or the tensor."""
    local = getattr(value, "_local_tensor", None)
    return value if local is None else local
