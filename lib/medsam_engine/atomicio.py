"""Files replaced atomically: written whole under a temporary name beside the target, then renamed.

A reader, or a restart after a kill -9 or a full disk, finds the old file or the new one, never
a part of one. The temporary is a hidden directory next to the target, named after the writing
process, holding a file with the target's own name: writers that pick the format from the
extension (SimpleITK) work, and no datastore listing (`*.nii.gz` in the folder) matches it.
`remove_stale_temps` deletes the ones whose writer is gone (killed mid-write).

Written here because the standard library has no atomic replace that keeps the file name.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

TEMP_SUFFIX = ".partial"
# Tells this process from an earlier one with the same pid (a restarted container's server is pid 1 again).
_TOKEN = secrets.token_hex(4)
_TEMP_NAME = re.compile(r"\.(\d+)-([0-9a-f]{8})\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX) + "$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write the whole new `path` at; on leaving the block it is flushed to
    disk and renamed to `path`. On any error (a full disk, an exception in the block) the temporary
    is removed and `path` is as it was. Nest two blocks to write two files before renaming either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-{_TOKEN}.", suffix=TEMP_SUFFIX,
                                    dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself survives a power cut
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to write the whole file at a temporary path, then rename it to `path` (see `staged`)."""
    with staged(path) as tmp:
        write(tmp)
    return Path(path)


def _writer_alive(pid: int, token: str) -> bool:
    if pid == os.getpid():
        return token == _TOKEN
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete the temporaries in `directory` whose writing process is gone; return what was deleted.

    A live writer's temporary is kept, so any process (the server, a train subprocess) may call this."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = directory.rglob(f".*{TEMP_SUFFIX}") if recursive else directory.glob(f".*{TEMP_SUFFIX}")
    removed = []
    for entry in list(found):
        match = _TEMP_NAME.search(entry.name)
        if match and entry.is_dir() and not _writer_alive(int(match[1]), match[2]):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
