"""The output folder of one process: checked before any work, written as a staging folder beside it, put in place
at the end.

:func:`create_staging` checks the output (:func:`check_output_folder`, the free space with
:func:`require_free_space`), removes staging folders that relex processes no longer running left of it
(:func:`remove_stale_staging`) and creates ``.OUT.relex-partial-PID`` beside it; :meth:`Staging.put_in_place`
renames that folder to the output, and :meth:`Staging.discard` removes it. An interrupted run therefore never
leaves a folder that looks complete. A disk that fills while writing gets one line (:func:`disk_full_error`).
Which process does what with these pieces when several write one output is decided above this package.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from relex.errors import RelexInputError

log = logging.getLogger("relex")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Staging:
    """The staging folder of output ``out_dir``, and the parent folders created for it (none existed before)."""

    out_dir: Path
    folder: Path
    created: tuple[Path, ...]

    def put_in_place(self, overwrite: bool) -> None:
        """Rename the staging folder to ``out_dir`` (replacing it with ``overwrite``). Raises
        :class:`RelexInputError` if ``out_dir`` appeared meanwhile and ``overwrite`` is off; on any failure the
        staging folder is removed, so neither a complete-looking nor a partial output is left."""
        try:
            self._rename(overwrite)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def _rename(self, overwrite: bool) -> None:
        if self.out_dir.exists():
            if not overwrite:
                raise RelexInputError("output folder appeared while writing; not replacing it", self.out_dir)
            old = self.out_dir.parent / f".{self.out_dir.name}.relex-old-{os.getpid()}"
            os.replace(self.out_dir, old)
            os.replace(self.folder, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.folder, self.out_dir)

    def discard(self) -> None:
        """Remove the staging folder and the parent folders created for it (those still empty)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                pass


def create_staging(out_dir: str | Path, overwrite: bool = False, needed_bytes: int = 0) -> Staging:
    """Check the output folder and create its staging folder ``.OUT.relex-partial-PID`` beside it.

    Refuses (:class:`RelexInputError`) an existing ``out_dir`` unless ``overwrite``, an unwritable location,
    and (with ``needed_bytes``) a disk with less free space than that. Staging folders of this output left by
    relex processes that no longer run are removed first.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    remove_stale_staging(out_dir)
    if needed_bytes:
        require_free_space(out_dir, needed_bytes)
    folder = out_dir.parent / f".{out_dir.name}.relex-partial-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    created = tuple(p for p in [out_dir.parent, *out_dir.parent.parents] if not p.exists())
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise RelexInputError(f"output folder is not writable ({exc.strerror})", out_dir) from None
    return Staging(out_dir, folder, created)


def disk_full_error(exc: BaseException, out_dir: Path) -> RelexInputError | None:
    """The one-line error for ``exc`` when it says the disk of ``out_dir`` is full (``ENOSPC``, ``EDQUOT``),
    else None."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return RelexInputError(f"the output's disk is full ({exc.strerror}); nothing was written, and "
                               f"{_gb(free_bytes(out_dir))} are free now", out_dir)
    return None


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove ``.OUT.relex-partial-PID`` / ``.OUT.relex-old-PID`` folders of ``out_dir`` whose process is gone.

    A run killed outright (SIGKILL, out of memory) cannot clean up after itself; the next run for the same
    output does. Folders of processes still running are left alone. Each removal is logged (``relex``).
    """
    parent = out_dir.parent
    removed = []
    if not parent.is_dir():
        return removed
    for marker in ("relex-partial", "relex-old"):
        for folder in parent.glob(f".{out_dir.name}.{marker}-*"):
            pid_text = folder.name.rsplit("-", 1)[-1]
            if not pid_text.isdigit() or _process_alive(int(pid_text)):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
                log.warning("removed %s, left by relex process %s, which no longer runs", folder, pid_text)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a folder of this process is from an earlier, finished call
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def check_output_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output folder (unless overwriting) and an unwritable parent, before any work."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RelexInputError("output path exists and is not a folder", out_dir)
    if out_dir.exists() and not overwrite:
        raise RelexInputError("output folder exists (pass --overwrite to replace it)", out_dir)
    parent = out_dir.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RelexInputError("output folder is not writable", out_dir)


def check_output_file(path: Path | None) -> None:
    """Refuse, before any work, an output file (a summary, a report, a JSON record) that cannot be written: its
    folder missing or not writable, or the path an existing folder."""
    if path is None:
        return
    path = Path(path)
    if not path.parent.is_dir():
        raise RelexInputError("folder does not exist", path.parent)
    if path.is_dir():
        raise RelexInputError("is a folder, not a file", path)
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise RelexInputError("not writable", path)


def free_bytes(path: Path) -> int:
    """Free bytes on the disk holding ``path`` (or its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def require_free_space(out_dir: Path, needed: int) -> None:
    """Refuse, before any work, an output that does not fit the free space of its disk."""
    free = free_bytes(out_dir)
    if needed > free:
        raise RelexInputError(f"not enough free disk space: the output needs {_gb(needed)}, the disk has "
                              f"{_gb(free)} free", out_dir)
