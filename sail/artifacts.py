"""Atomic, validated run artifacts (stub: the artifacts engineer's version replaces this at merge).

    write_atomic(path, data)        temp file in the same folder, fsync, os.replace, fsync the folder
    write_json(path, obj)           the same for JSON
    read_json(path, what=..., ...)  a damaged file -> one SailError naming it and what to do
    with Lock(directory, what="run"): ...   one writer per directory
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sail.errors import SailError


def write_atomic(path, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj, *, indent=2) -> None:
    write_atomic(path, json.dumps(obj, indent=indent, default=str) + "\n")


def read_json(path, *, what: str, expect: type = dict, required: tuple[str, ...] = ()) -> object:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise SailError(f"{path}: {what} is missing; recreate it") from None
    except (OSError, ValueError) as e:
        raise SailError(f"{path}: {what} is damaged ({type(e).__name__}); recreate it") from None
    if not isinstance(obj, expect):
        raise SailError(f"{path}: {what} is damaged (not a {expect.__name__}); recreate it")
    missing = [k for k in required if k not in obj]
    if missing:
        raise SailError(f"{path}: {what} is damaged (no {', '.join(missing)}); recreate it")
    return obj


class Lock:
    """One writer per directory: a pid file; a lock whose process is gone is taken over."""

    def __init__(self, directory, what: str = "run"):
        self.path = Path(directory) / ".lock"
        self.what = what

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    self.path.unlink(missing_ok=True)
                    continue
                except PermissionError:
                    pass
                raise SailError(f"{self.path.parent}: another {self.what} (pid {pid}) is writing here; "
                                "wait for it or use another directory") from None
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
