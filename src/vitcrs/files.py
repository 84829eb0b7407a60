"""Writing a file whole: a reader (another process, a crash's aftermath) sees the old file or the new one,
never a part of either."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)  # read the process umask (and put it back): written files get the usual mode
os.umask(_UMASK)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary file beside `path` (its folder is created) for the block to write; when the block
    ends without an error it is synced to disk and moved over `path` (`os.replace`, atomic), otherwise
    removed. It gets the mode a plain `open` would give (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it private (0600); a result file is for everyone
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole (`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` to `path` as indented JSON with a final newline, whole (`replacing`)."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
