"""The staged output folder of one run, in one process or across the ranks of a distributed run.

The single-process pieces are :mod:`relex.io.staging`'s; this module decides which rank does what with them.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from relex.distributed import SINGLE, Ranks
from relex.io.staging import create_staging, disk_full_error


@contextmanager
def staged_folder(out_dir: str | Path, overwrite: bool = False, needed_bytes: int = 0,
                  ranks: Ranks = SINGLE) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; rename it to ``out_dir`` on success, delete it on failure.

    Refuses an existing ``out_dir`` unless ``overwrite``, an unwritable location, and (with ``needed_bytes``) a
    disk with less free space than that, before yielding. Staging folders of this output left by relex
    processes that no longer run (killed, e.g. by SIGKILL) are removed first. A disk that fills while
    writing raises :class:`relex.errors.RelexInputError` (one line), and the partial folder is removed.

    Across ``ranks`` (the output is on a file system every rank sees): rank 0 checks, creates the folder
    under its own pid and hands its name to every rank; the body must end at a sync point, after which rank 0
    renames (or, when any rank failed, removes) the folder, and every rank learns how that went.
    """
    out_dir = Path(out_dir)
    staging = ranks.from_leader(lambda: create_staging(out_dir, overwrite, needed_bytes))
    try:
        yield staging.folder
    except BaseException as exc:
        if ranks.leader:
            staging.discard()
        error = disk_full_error(exc, out_dir)
        if error is not None:
            raise error from None
        raise
    ranks.step(lambda: staging.put_in_place(overwrite) if ranks.leader else None)
