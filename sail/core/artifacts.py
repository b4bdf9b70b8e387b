"""Every file sail writes, written atomically and read back defensively; one writer per directory.

    write_json(run / "summary.json", {"steps": 100, "recall@1": 0.8})   # temp file, fsync, rename, fsync dir
    summary = read_json(run / "summary.json", what="run summary", required=("steps",))
    with Lock(run, what="run"):                                          # a second writer gets one error line
        ...

A reader never sees half a file: `write_atomic` writes a temporary file beside the target, fsyncs it,
renames it over the target and fsyncs the directory, so a crash leaves either the old file or the new
one. A full disk or a file-size limit leaves no temporary file behind and raises one `SailError` line.

`read_json` turns a missing, truncated, foreign or wrong-shaped file into `DamagedArtifact` (a SailError)
that names the file, what is wrong with it and what to do; callers that can recover (a sweep retrains a
run whose files are damaged) catch that type.

`Lock` is an `fcntl.flock` on a lock file inside the directory: the OS releases it when the holder dies,
so a lock left by a killed process is taken over without asking. The holder's pid, host and start time
are written into the file for the message the second writer gets.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from sail.core.errors import SailError


class DamagedArtifact(SailError):
    """A file sail wrote earlier is missing, truncated, foreign or of the wrong shape."""


def _reason(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if e.errno == errno.EFBIG:
        return "file too large for the file-size limit"
    return e.strerror or str(e)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def fsync_dir(directory) -> None:
    """Public form of the directory fsync, for code that renames whole directories (checkpoints, indexes)."""
    _fsync_dir(Path(directory))


def write_atomic(path, data: bytes | str) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix.
    Raises SailError (no traceback, no stray temporary file) when the disk is full or not writable."""
    path = Path(path)
    blob = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SailError(f"cannot write {path} ({_reason(e)}); free space or choose a writable folder, "
                        "then run the command again") from None
    _fsync_dir(path.parent)


def write_json(path, obj, *, indent=2, default=None) -> None:
    """Atomic JSON write (see write_atomic); `default` as in json.dumps."""
    write_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")


@contextlib.contextmanager
def atomic_files(paths, encoding="utf-8"):
    """Open text files to stream into (large outputs written row by row, where write_atomic would need them whole):
    `with atomic_files([out, rejects]) as (f, g): ...`. Each is written beside its target and renamed into place
    only when the block ends without error, all of them, then the folders are fsynced; an exception (Ctrl-C too)
    leaves the old files and no temporary; a full disk is one SailError line."""
    paths = [Path(p) for p in paths]
    temps = [p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in paths]
    try:
        with contextlib.ExitStack() as stack:
            files = []
            for tmp in temps:
                tmp.parent.mkdir(parents=True, exist_ok=True)
                files.append(stack.enter_context(open(tmp, "w", encoding=encoding, newline="")))
            yield files
            for f in files:
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    except OSError as e:
        raise SailError(f"cannot write {', '.join(map(str, paths))} ({_reason(e)}); free space or choose a "
                        "writable folder, then run the command again") from None
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    for folder in {p.parent for p in paths}:
        _fsync_dir(folder)


def fsync_tree(folder) -> None:
    """fsync every file under folder, then every directory, deepest first (its entries before itself)."""
    folder = Path(folder)
    dirs = [folder]
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        _fsync_dir(d)


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` for a library that writes the file itself (torch.save, faiss, h5py):
    `with atomic_path(out) as tmp: torch.save(obj, tmp)`. When the block ends without error the file is fsynced
    and renamed onto `path` (then the folder fsynced); otherwise (Ctrl-C too) it is removed and `path` is
    untouched. OSErrors propagate: the caller knows what it was writing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path, replace: bool = False):
    """A temporary folder beside `path` to fill: `with atomic_dir(index) as tmp: ...`. When the block ends without
    error every file and folder in it is fsynced and it is renamed to `path` as a whole, so readers see no folder,
    the old one, or the complete new one; an existing `path` that is an empty folder (or anything, with replace)
    is moved aside first and removed after; a non-empty one without replace raises FileExistsError and is kept.
    On an error (Ctrl-C too) the temporary folder is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    aside = path.with_name(f".{path.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process with our pid: ours to clear
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            if not (replace or (path.is_dir() and not any(path.iterdir()))):
                raise FileExistsError(errno.EEXIST, "exists and is not empty", str(path))
            os.replace(path, aside)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)


def damaged(path, what: str, problem: str, todo: str | None = None) -> DamagedArtifact:
    """The one message for a damaged artifact: '<path>: <what> is damaged (<problem>); <what to do>'."""
    todo = todo or f"delete {path} and run the command that wrote it again"
    return DamagedArtifact(f"{path}: {what} is damaged ({problem}); {todo}")


_TYPE_NAMES = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "a number", float: "a number"}


def read_json(path, *, what: str, expect: type = dict, required: tuple[str, ...] = (), todo: str | None = None) -> object:
    """Read a JSON file sail wrote; anything but a readable `expect` holding every `required` key raises
    DamagedArtifact naming the file, the problem and `todo` (default: delete it and rerun)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DamagedArtifact(f"{path}: {what} is missing; {todo or 'run the command that writes it first'}") from None
    except IsADirectoryError:
        raise damaged(path, what, "a directory, not a file", todo) from None
    except OSError as e:
        raise damaged(path, what, f"unreadable: {_reason(e)}", todo) from None
    except UnicodeDecodeError:
        raise damaged(path, what, "not text", todo) from None
    if not text.strip():
        raise damaged(path, what, "empty", todo)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        cut = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        problem = "truncated" if cut else f"not JSON: {e.msg} at line {e.lineno}"
        raise damaged(path, what, problem, todo) from None
    if not isinstance(obj, expect) or (expect in (int, float) and isinstance(obj, bool)):
        found = type(obj).__name__ if obj is not None else "null"
        raise damaged(path, what, f"holds a {found} instead of {_TYPE_NAMES.get(expect, expect.__name__)}", todo)
    missing = [k for k in required if k not in obj] if isinstance(obj, dict) else []
    if missing:
        raise damaged(path, what, f"missing {', '.join(repr(k) for k in missing)}", todo)
    return obj


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces (checkpoints, indexes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksums(folder, names) -> dict[str, str]:
    """{file name: sha256} for the named files in `folder`: written into a manifest, compared by `verify_checksums`."""
    return {n: sha256_file(Path(folder) / n) for n in sorted(names)}


def verify_checksums(folder, expected: dict) -> list[str]:
    """The files in `folder` whose bytes differ from `expected` (or that are gone): an empty list when intact."""
    bad = []
    for name, digest in expected.items():
        f = Path(folder) / name
        if not f.is_file() or sha256_file(f) != digest:
            bad.append(name)
    return bad


_HELD: dict[Path, list] = {}  # lock file -> [fd, depth]: a process re-entering its own lock does not block itself


class Lock:
    """`with Lock(directory, what="run"):` one writer per directory (see the module doc).
    `name` picks the lock file, so one folder can hold several locked things (stores: `.NAME.h5.lock`).
    Re-entering a lock this process holds is allowed; under torchrun only rank 0 takes it."""

    def __init__(self, directory, what: str = "run", name: str = ".sail.lock"):
        self.directory = Path(directory)
        self.what = what
        self.file = self.directory / name

    def _holder(self) -> str:
        try:
            info = json.loads(self.file.read_text())
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def _open_locked(self) -> int:
        """Open and flock the lock file; retry when the file was replaced between open and flock
        (the previous holder removes it on release)."""
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return fd  # a filesystem without locks (some NFS): work on unguarded rather than refuse
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    raise SailError(f"{self.directory} is in use by another sail {self.what} ({self._holder()}); "
                                    "wait for it to finish or stop it, or choose another output") from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def __enter__(self) -> "Lock":
        held = _HELD.get(self.file.absolute())
        if int(os.environ.get("RANK", "0")) != 0:  # the ranks of one torchrun job are one writer: rank 0 locks
            return self
        if held:
            held[1] += 1
            return self
        if self.directory.exists() and not self.directory.is_dir():
            raise SailError(f"{self.directory} is a file; the {self.what} needs a directory there: choose another path")
        try:
            self.created = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = self._open_locked()
            stamp = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(stamp).encode())
        except SailError:
            raise
        except OSError as e:
            raise SailError(f"cannot lock {self.directory} for the {self.what} ({_reason(e)}); "
                            "choose a writable folder") from None
        _HELD[self.file.absolute()] = [fd, 1]
        return self

    def __exit__(self, *exc) -> None:
        key = self.file.absolute()
        held = _HELD.get(key)
        if not held:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        try:  # unlink while still holding the lock: a waiter that opened the old file notices and retries
            self.file.unlink(missing_ok=True)
            if getattr(self, "created", False) and not any(self.directory.iterdir()):
                self.directory.rmdir()  # a refused command leaves no empty folder behind
        except OSError:
            pass
        os.close(held[0])
