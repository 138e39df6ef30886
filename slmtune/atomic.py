"""Writes that a reader never sees half done: a temp file or folder beside the target, then a rename.

    atomic.write_text(run_dir / "summary.json", text)
    with atomic.directory(out, replace=True) as tmp:     # fill tmp; it becomes `out` on success
        model.save_pretrained(tmp)

On an exception the temp file or folder is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def directory(dest: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """A fresh folder beside `dest`, renamed to `dest` when the block succeeds. With `replace`, an
    existing `dest` is removed first; without it, `dest` may only be missing or empty."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the result is an ordinary folder
        if dest.exists():
            if replace:
                shutil.rmtree(dest)
            else:
                dest.rmdir()  # empty by the caller's check; raises if something appeared meanwhile
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
