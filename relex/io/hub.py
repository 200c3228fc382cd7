"""Checkpoints on the Hugging Face Hub: one model by id, or a whole trajectory given as ``hf://ORG/REPO``.

A trajectory on the Hub is laid out in one of two ways:

* one branch (or tag) per checkpoint, e.g. ``step_1`` … ``step_500`` (``revision_pattern``, default
  ``step_{N}``);
* one folder per checkpoint inside one revision, e.g. ``step-0010/`` of ``main`` (``subfolder_pattern``;
  ``hf://ORG/REPO@REVISION`` picks another revision).

Only what relex reads is downloaded — safetensors weights and their index, the config, generation config,
tokenizer files and a LoRA adapter's config; never pickles (``*.bin``, ``*.pt``), optimizer states or
anything else — into the normal Hugging Face cache (``huggingface_hub.constants.HF_HUB_CACHE``, read at
call time), after checking that its disk has room for what is not cached yet. With ``HF_HUB_OFFLINE=1``
nothing touches the network: steps are listed from the cache's documented layout
(``models--ORG--NAME/refs/<revision>`` holds a commit id, ``snapshots/<commit>/`` the files).
"""

from __future__ import annotations

import functools
import inspect
import os
import posixpath
import re
import shutil
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from relex.errors import RelexInputError
from relex.io.files import AUX_FILES
from relex.io.steps import parse_steps

HUB_PREFIX = "hf://"
DEFAULT_REVISION_PATTERN = "step_{N}"

ProgressCallback = Callable[[str, int, int], None]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Besides the weights, the files relex reads or copies into its output (relex.io.files.AUX_FILES).
_ADAPTER_CONFIG = "adapter_config.json"
_WEIGHT_INDEX = "model.safetensors.index.json"
# Safetensors files a trainer may save beside the model that are not model weights.
_NOT_WEIGHTS = ("optimizer", "scheduler", "rng_state", "training_args")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PICKLE_HINT = ("relex downloads safetensors only; convert the checkpoints to safetensors, or download them "
                "yourself and pass the local run folder with --allow-pickle")


def _hf():
    """The ``huggingface_hub`` module, imported on first use."""
    # start-up: huggingface_hub (and its HTTP client) take about 0.3 s to import, and most runs are local folders.
    # huggingface_hub 1.x and 2.x load their submodules lazily: ``constants`` and ``utils`` are imported by name,
    # never reached as attributes of a package that may not have loaded them yet.
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.utils

    return huggingface_hub


@functools.lru_cache(maxsize=1)
def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection errors: the built-in ones and those of the HTTP client huggingface_hub uses (by version)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


# --------------------------------------------------------------------------------------------- specs


def is_hub_id(text: str) -> bool:
    """True for ``ORG/NAME`` (a Hub model id) that is not an existing local path."""
    parts = str(text).split("/")
    return len(parts) == 2 and all(parts) and not Path(text).exists() and not str(text).startswith((".", "/"))


def parse_hub_run(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` of ``hf://ORG/REPO`` or ``hf://ORG/REPO@REVISION``; None for anything else.

    Raises :class:`RelexInputError` for text that starts with ``hf://`` but names no repository.
    """
    text = str(text)
    if not text.startswith(HUB_PREFIX):
        return None
    repo_id, at, revision = text[len(HUB_PREFIX):].rstrip("/").partition("@")
    if not _REPO_ID.match(repo_id) or (at and not revision):
        raise RelexInputError(f"{text}: not a Hub run (write hf://ORG/REPO or hf://ORG/REPO@REVISION)")
    return repo_id, revision or None


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; honour it also when set later (notebooks, tests).
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(_hf().constants.HF_HUB_OFFLINE) or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cache_dir() -> Path:
    """The Hugging Face cache, read at call time (so a changed ``constants.HF_HUB_CACHE`` is honoured)."""
    return Path(_hf().constants.HF_HUB_CACHE).expanduser()


def _storage(cache_dir: Path, repo_id: str) -> Path:
    """The cache folder of a model repository (the documented ``models--ORG--NAME`` layout)."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


# --------------------------------------------------------------------------------------------- step patterns


class _StepPattern:
    """A revision or folder name with the step as ``{N}`` (any integer format spec, e.g. ``{N:04d}``)."""

    def __init__(self, pattern: str, option: str):
        self.pattern = pattern
        usage = f"{option} must contain {{N}} once, e.g. step_{{N}} or step-{{N:04d}}; got {pattern!r}"
        try:
            fields = [(literal, name, conversion) for literal, name, _, conversion in string.Formatter().parse(pattern)]
            pattern.format(N=1)
        except (ValueError, KeyError, IndexError):
            raise RelexInputError(usage) from None
        names = [name for _, name, _ in fields if name is not None]
        if names != ["N"] or any(conversion for _, _, conversion in fields):
            raise RelexInputError(usage)
        regex = "".join(re.escape(literal) + (r"(\d+)" if name is not None else "") for literal, name, _ in fields)
        self._regex = re.compile(regex)

    def name(self, step: int) -> str:
        return self.pattern.format(N=step)

    def step(self, name: str) -> int | None:
        """The step a name stands for, or None; ``{N:04d}`` matches ``0010`` but not ``10``."""
        match = self._regex.fullmatch(name)
        if match is None:
            return None
        step = int(match.group(1))
        return step if self.name(step) == name else None


# --------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class _RemoteFile:
    """A file of a repository revision: path in the repo, size in bytes, and its blob id in the cache."""

    path: str
    size: int | None = None
    etag: str | None = None  # the LFS sha256, or the git blob id: the file's name under blobs/


@dataclass
class _Checkpoint:
    """One checkpoint of a Hub trajectory: where it is and which of its files relex needs."""

    step: int | None
    label: str  # for messages: hf://ORG/REPO@REVISION[/FOLDER]
    revision: str  # the branch, tag or commit named by the user (or main)
    commit: str
    folder: str  # "" (the revision's root) or the checkpoint's folder in the repo
    files: list[_RemoteFile] = field(default_factory=list)

    def local_folder(self, cache_dir: Path, repo_id: str) -> Path:
        snapshot = _storage(cache_dir, repo_id) / "snapshots" / self.commit
        return snapshot / self.folder if self.folder else snapshot


def _wanted(name: str) -> bool:
    """True for the files relex reads from a checkpoint folder (by file name)."""
    if name.endswith(".safetensors"):
        return not name.startswith(_NOT_WEIGHTS)
    return name in (_WEIGHT_INDEX, _ADAPTER_CONFIG) or name in AUX_FILES


def _select(checkpoint: _Checkpoint, files: Sequence[_RemoteFile]) -> None:
    """Keep in ``checkpoint.files`` the files relex needs among the direct children of its folder.

    Raises :class:`RelexInputError` when the folder holds no safetensors weights (with a hint when it holds
    pickles only).
    """
    children = [f for f in files if posixpath.dirname(f.path) == checkpoint.folder]
    checkpoint.files = [f for f in children if _wanted(posixpath.basename(f.path))]
    if any(f.path.endswith(".safetensors") for f in checkpoint.files):
        return
    pickles = [posixpath.basename(f.path) for f in children if f.path.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise RelexInputError(f"{checkpoint.label}: only pickled weights ({pickles[0]}"
                              f"{', …' if len(pickles) > 1 else ''}); {_PICKLE_HINT}")
    raise RelexInputError(f"{checkpoint.label}: no safetensors weights (model.safetensors or an index)")


def _local_files(folder: Path, under: str = "") -> list[_RemoteFile]:
    """The files directly inside ``folder`` of a cached snapshot, as repository paths under ``under``."""
    if not folder.is_dir():
        return []
    return [_RemoteFile(posixpath.join(under, p.name) if under else p.name) for p in sorted(folder.iterdir())
            if p.is_file()]


# --------------------------------------------------------------------------------------------- Hub access


class _HubErrors:
    """Turn huggingface_hub and network errors into one-line :class:`RelexInputError` naming ``where``."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, RelexInputError) or not isinstance(error, Exception):
            return False
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        errors = _hf().utils
        if isinstance(error, errors.GatedRepoError):
            problem = ("gated repository: accept its conditions on huggingface.co and log in (hf auth login "
                       "or HF_TOKEN)")
        elif isinstance(error, errors.RepositoryNotFoundError):
            problem = "no such model repository on the Hub (or it is private: log in with hf auth login or HF_TOKEN)"
        elif isinstance(error, errors.RevisionNotFoundError):
            problem = "no such revision on the Hub"
        elif isinstance(error, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)):
            problem = f"not in the local cache and HF_HUB_OFFLINE is set ({detail})"
        elif isinstance(error, errors.HfHubHTTPError):
            problem = f"Hub request failed ({detail})"
        elif isinstance(error, _network_errors()):
            problem = (f"cannot reach the Hub ({type(error).__name__}: {detail}); with HF_HUB_OFFLINE=1 relex "
                       "reads the local cache only")
        elif isinstance(error, OSError):  # e.g. the disk filled up while writing into the cache
            problem = f"download failed ({type(error).__name__}: {detail})"
        else:
            return False
        raise RelexInputError(f"{self.where}: {problem}") from None


def _remote_refs(repo_id: str) -> dict[str, str]:
    """Branches and tags of a repository on the Hub: name → commit id."""
    refs = _hf().HfApi().list_repo_refs(repo_id)
    return {ref.name: ref.target_commit for ref in [*refs.branches, *refs.tags]}


def _remote_files(repo_id: str, revision: str) -> tuple[str, list[_RemoteFile]]:
    """The commit id of ``revision`` on the Hub and every file of it, with sizes and blob ids."""
    info = _hf().HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    files = []
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        etag = getattr(lfs, "sha256", None) if lfs is not None else sibling.blob_id
        files.append(_RemoteFile(sibling.rfilename, sibling.size, etag))
    return info.sha, files


def _local_refs(storage: Path) -> dict[str, str]:
    """Branches and tags recorded in the cache (``refs/<name>`` files holding a commit id): name → commit."""
    refs = storage / "refs"
    if not refs.is_dir():
        return {}
    return {p.relative_to(refs).as_posix(): p.read_text().strip() for p in sorted(refs.rglob("*")) if p.is_file()}


def _local_commit(storage: Path, revision: str) -> str | None:
    """The cached commit of ``revision`` (a commit id, or a ref recorded in the cache), or None."""
    if _COMMIT.match(revision):
        return revision if (storage / "snapshots" / revision).is_dir() else None
    return _local_refs(storage).get(revision)


# --------------------------------------------------------------------------------------------- downloads


def _cached(cache_dir: Path, repo_id: str, checkpoint: _Checkpoint, file: _RemoteFile) -> bool:
    storage = _storage(cache_dir, repo_id)
    if (storage / "snapshots" / checkpoint.commit / file.path).exists():
        return True
    return file.etag is not None and (storage / "blobs" / file.etag).is_file()


def _free_bytes(folder: Path) -> int:
    """Free space on the disk of ``folder`` (or of its nearest existing parent)."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _check_space(where: str, cache_dir: Path, needed: int) -> None:
    """Refuse, before downloading anything, when the cache's disk has less room than the download needs."""
    free = _free_bytes(cache_dir)
    if needed > free:
        raise RelexInputError(
            f"{where}: the download needs {_human(needed)} in the Hugging Face cache {cache_dir} but only "
            f"{_human(free)} is free (free some space or point HF_HUB_CACHE to a larger disk)")


def _silent_tqdm(report: Callable[[int], None]):
    """huggingface_hub's tqdm class, silent, forwarding each file's written bytes to ``report``."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class _Reporting(hub_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # relex draws its own bar
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            report(int(n or 0))

        def update_transfer(self, n=1):
            # Bytes received from the network, reported beside the bytes written (``update``): count one.
            pass

    return _Reporting


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """Record ``revision`` → ``commit`` in the cache's refs/ (as huggingface_hub does), for offline use."""
    if _COMMIT.match(revision):
        return
    ref = storage / "refs" / revision
    if ref.is_file() and ref.read_text().strip() == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=ref.parent, delete=False) as handle:
        handle.write(commit)
    os.replace(handle.name, ref)


def download_file(repo_id: str, filename: str, **options) -> str:
    """One file of a repository into the cache: ``huggingface_hub.hf_hub_download``; its local path."""
    return _hf().hf_hub_download(repo_id, filename, **options)


def _download(repo_id: str, checkpoints: Sequence[_Checkpoint], cache_dir: Path, where: str,
              progress: ProgressCallback | None) -> None:
    """Download the listed files into the cache after the free-space check, reporting bytes to ``progress``."""
    pending = [(c, f) for c in checkpoints for f in c.files if not _cached(cache_dir, repo_id, c, f)]
    total = sum(f.size or 0 for _, f in pending)
    _check_space(where, cache_dir, total)
    # Older huggingface_hub versions take no tqdm_class in hf_hub_download: then progress moves per file.
    per_byte = "tqdm_class" in inspect.signature(_hf().hf_hub_download).parameters
    done = 0
    for checkpoint, file in pending:
        counted = 0

        def report(n: int, file=file) -> None:
            nonlocal counted
            counted = min(counted + n, file.size or 0)
            if progress is not None:
                progress(file.path, done + counted, total)

        options = {"tqdm_class": _silent_tqdm(report)} if per_byte else {}
        with _HubErrors(f"{checkpoint.label}: {posixpath.basename(file.path)}"):
            # Pinned to the listed commit, so every file of a checkpoint comes from the same commit.
            download_file(repo_id, file.path, revision=checkpoint.commit, cache_dir=cache_dir, **options)
        done += file.size or 0
        if progress is not None:
            progress(file.path, done, total)
    for checkpoint in checkpoints:
        _write_ref(_storage(cache_dir, repo_id), checkpoint.revision, checkpoint.commit)


def _fetch(repo_id: str, checkpoints: Sequence[_Checkpoint], files_of: Callable[[_Checkpoint], list[_RemoteFile]],
           where: str, progress: ProgressCallback | None) -> list[Path]:
    """Select, check and (online) download the files of ``checkpoints``; their local folders, in order."""
    cache_dir = _cache_dir()
    for checkpoint in checkpoints:
        _select(checkpoint, files_of(checkpoint))
    if not _offline():
        _download(repo_id, checkpoints, cache_dir, where, progress)
    folders = []
    for checkpoint in checkpoints:
        folder = checkpoint.local_folder(cache_dir, repo_id)
        missing = [f.path for f in checkpoint.files if not (folder / posixpath.basename(f.path)).is_file()]
        if missing:  # a broken symlink (blob deleted) or a file removed from the snapshot
            raise RelexInputError(f"{checkpoint.label}: {missing[0]} is missing from the local cache ({folder})")
        folders.append(folder)
    return folders


# --------------------------------------------------------------------------------------------- public API


def resolve_model(repo_id: str, revision: str | None = None, progress: ProgressCallback | None = None) -> Path:
    """A local snapshot folder of Hub model ``repo_id`` with its weights, config and tokenizer files.

    ``repo_id`` is ``ORG/NAME`` (or ``hf://ORG/NAME[@REVISION]``); ``revision`` defaults to ``main``. Online,
    the files relex reads are downloaded into the Hugging Face cache (after a free-space check, with bytes
    reported to ``progress(name, done, total)``); offline (``HF_HUB_OFFLINE=1``) the cache alone is used.
    Raises :class:`RelexInputError` (one line) for a model that cannot be found, reached or read.
    """
    parsed = parse_hub_run(repo_id)
    if parsed is not None:
        repo_id, revision = parsed[0], revision or parsed[1]
    if not _REPO_ID.match(repo_id):
        raise RelexInputError(f"{repo_id}: not a Hub model id (ORG/NAME)")
    revision = revision or "main"
    where = repo_id if revision == "main" else f"{repo_id}@{revision}"
    if _offline():
        commit = _local_commit(_storage(_cache_dir(), repo_id), revision)
        if commit is None:
            raise RelexInputError(f"{where}: neither a local folder nor in the Hugging Face cache "
                                  f"({_cache_dir()}; offline)")
    else:
        with _HubErrors(where):
            commit, files = _remote_files(repo_id, revision)
    checkpoint = _Checkpoint(None, where, revision, commit, "")
    if _offline():
        (folder,) = _fetch(repo_id, [checkpoint],
                           lambda c: _local_files(c.local_folder(_cache_dir(), repo_id)), where, progress)
    else:
        (folder,) = _fetch(repo_id, [checkpoint], lambda c: files, where, progress)
    return folder


def resolve_hub_run(
    spec: str,
    steps: str | Sequence[int] | None,
    *,
    revision_pattern: str = DEFAULT_REVISION_PATTERN,
    subfolder_pattern: str | None = None,
    progress: ProgressCallback | None = None,
    max_step: int | None = None,
    include_base: bool = True,
) -> list[tuple[int, Path]]:
    """``(step, local folder)`` of each checkpoint of the Hub trajectory ``spec`` (``hf://ORG/REPO[@REV]``).

    Checkpoints are the branches and tags named by ``revision_pattern`` (``{N}`` the step, e.g. ``step_{N}``
    or ``step-{N:04d}``), or — with ``subfolder_pattern`` — the matching folders of one revision (``main``
    unless ``@REV`` is given). ``steps`` (a list, or text such as ``10,20``, ``1-75`` or ``10-100:10``) and
    ``max_step`` restrict them; with ``include_base`` step 0 is kept too when the trajectory has it (the
    run's own base, as in a local run folder). Only weight (safetensors), config and tokenizer files are
    downloaded, into the Hugging Face cache, after checking the cache's free disk space; with
    ``HF_HUB_OFFLINE=1`` everything comes from the cache. ``progress(name, done, total)`` gets the bytes
    downloaded.

    Raises:
        RelexInputError: one line, for a missing revision or folder of a requested step, a repository
            that cannot be found or reached, pickled-only weights, or too little free disk space.
    """
    parsed = parse_hub_run(spec)
    if parsed is None:
        raise RelexInputError(f"{spec}: not a Hub run (write hf://ORG/REPO or hf://ORG/REPO@REVISION)")
    repo_id, revision = parsed
    where = f"{HUB_PREFIX}{repo_id}"
    offline = _offline()
    cache_dir = _cache_dir()
    storage = _storage(cache_dir, repo_id)
    if offline and not storage.is_dir():
        raise RelexInputError(f"{where}: not in the Hugging Face cache ({cache_dir}; offline)")
    place = "in the local cache; offline" if offline else "on the Hub"

    if subfolder_pattern is None:
        if revision is not None:
            raise RelexInputError(f"{spec}: @{revision} names one revision, but checkpoints are read from "
                                  f"branches ({revision_pattern}); pass --subfolder-pattern for checkpoint "
                                  "folders inside that revision")
        pattern = _StepPattern(revision_pattern, "--revision-pattern")
        if offline:
            refs = _local_refs(storage)
        else:
            with _HubErrors(where):
                refs = _remote_refs(repo_id)
        available = {}
        for name, commit in refs.items():
            step = pattern.step(name)
            if step is not None:
                available[step] = _Checkpoint(step, f"{where}@{name}", name, commit, "")
        kind, listed = "revision", sorted(refs)
        hint = "; for checkpoints in folders of one revision pass --subfolder-pattern"
    else:
        pattern = _StepPattern(subfolder_pattern.strip("/"), "--subfolder-pattern")
        revision = revision or "main"
        label = where if revision == "main" else f"{where}@{revision}"
        if offline:
            commit = _local_commit(storage, revision)
            if commit is None:
                raise RelexInputError(f"{where}: no revision {revision} ({place})")
            snapshot = storage / "snapshots" / commit
            depth = pattern.pattern.count("/") + 1
            folders = [p.relative_to(snapshot).as_posix() for p in snapshot.glob("/".join(["*"] * depth))
                       if p.is_dir()]
            files: list[_RemoteFile] = []
        else:
            with _HubErrors(f"{where}@{revision}"):
                commit, files = _remote_files(repo_id, revision)
            folders = sorted({posixpath.dirname(f.path) for f in files} - {""})
        available = {}
        for folder in folders:
            step = pattern.step(folder)
            if step is not None:
                available[step] = _Checkpoint(step, f"{label}/{folder}", revision, commit, folder)
        kind, listed = "subfolder", sorted(folders)
        hint = "; for checkpoints on branches leave out --subfolder-pattern" if not available else ""

    if not available:
        shown = ", ".join(listed[:5]) + (f" and {len(listed) - 5} more" if len(listed) > 5 else "")
        raise RelexInputError(f"{where}: no {kind} named like {pattern.pattern} ({place}; found: "
                              f"{shown or 'none'}){hint}")
    if steps is not None:
        wanted = parse_steps(steps)
        missing = [pattern.name(s) for s in wanted if s not in available]
        if missing:
            names = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise RelexInputError(f"{where}: no {kind}{'s' if len(missing) > 1 else ''} {names} ({place})")
        chosen = sorted(set(wanted) | ({0} if include_base and 0 in available else set()))
    else:
        chosen = sorted(available)
    if max_step is not None:
        chosen = [s for s in chosen if s <= max_step]
    checkpoints = [available[s] for s in chosen]

    if offline:
        files_of = lambda c: _local_files(c.local_folder(cache_dir, repo_id), c.folder)  # noqa: E731
    elif subfolder_pattern is None:
        listings: dict[str, list[_RemoteFile]] = {}
        for checkpoint in checkpoints:
            with _HubErrors(checkpoint.label):
                checkpoint.commit, listings[checkpoint.revision] = _remote_files(repo_id, checkpoint.revision)
        files_of = lambda c: listings[c.revision]  # noqa: E731
    else:
        files_of = lambda c: files  # noqa: E731
    folders = _fetch(repo_id, checkpoints, files_of, where, progress)
    return [(c.step, folder) for c, folder in zip(checkpoints, folders)]
