"""Files the platform writes: atomically, and only where a check before any work said it can."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from lsep_tune.errors import InputError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A binary file handle whose content appears at `path` only when the block ends without error:
    a crash or a full disk never leaves a truncated file that a later run would trust."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.chmod(tmp, mode)  # mkstemp makes the file private; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def require_writable_dir(folder: str | Path, source: str) -> None:
    """`folder` exists as a writable folder or could be created: checked without creating anything,
    so a request refused later leaves no empty folder behind."""
    folder = Path(folder)
    nearest = folder
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise InputError(source, folder, f"not writable ({nearest} is not a folder)")
    try:
        with tempfile.TemporaryFile(dir=nearest):  # a real probe: permissions lie to root and on /proc
            pass
    except OSError as err:
        raise InputError(source, folder, f"not writable ({err.strerror} in {nearest})") from None
