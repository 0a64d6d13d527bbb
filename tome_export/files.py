"""File helpers shared by every writer: atomic files, atomic output directories with their locks, digests.

A reader of any file tome-export writes sees the old content or the new one, never half of it: the data go to
a hidden temporary file beside the target, which is renamed into place only when complete. Whole output
directories (a build, a tune report) are written the same way: into a hidden, locked work directory that replaces
the output at the end (:func:`staged_output`), under a lock that keeps a second writer out (:func:`output_lock`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

from .errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: work directories are not locked, stale ones are not cleaned
    fcntl = None


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike], mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without error.

    For writers that want a file name (PIL, torch.save); on any exception the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Union[str, os.PathLike], data: Union[str, bytes]) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- work directories -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A hidden, locked work directory beside ``out``; it replaces ``out`` when the block ends without error and
    is removed otherwise, so ``out`` is always either the previous content or the complete new one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, lock = _locked_workdir(out.parent, f".{out.name}.tmp-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output should not be
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the build lock of the output directory ``out``: a hidden lock file beside it, locked exclusively.

    A second build of the same output while the lock is held is refused at once (it would replace the first
    build's result or race it in the final rename). The lock file is removed on release; a process killed while
    holding it leaves the file unlocked, which the next build takes over.
    """
    if fcntl is None:
        yield
        return
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"another tome-export build is writing {str(out)!r} now: wait for it to finish or "
                            f"choose another --output") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:  # its holder released and removed it while we waited for the lock
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _locked_workdir(parent: Path, prefix: str) -> Tuple[Path, Optional[int]]:
    """A new hidden directory and an open descriptor holding an exclusive lock on it.

    The lock lives as long as the process: a build killed mid-way (even by SIGKILL) leaves an unlocked
    directory, which is how the next build tells a stale work directory from one in use.
    """
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        if fcntl is None:
            return path, None
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a concurrent cleaner took it for stale before we locked it
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return path, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def remove_stale_workdirs(parent: Path, name: str) -> None:
    """Remove the hidden work directories of earlier builds of ``name`` that were killed mid-way."""
    if fcntl is None or not parent.is_dir():
        return
    pattern = glob.escape(str(parent / f".{name}."))
    for path in glob.glob(pattern + "tmp-*") + glob.glob(pattern + "old-*"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: a build in progress
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished build into place; an existing output is swapped out, then removed."""
    if out.exists():
        old, fd = _locked_workdir(out.parent, f".{out.name}.old-")
        try:
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
    else:
        os.replace(tmp, out)
