"""File helpers shared by every writer: atomic files, atomic output directories with their locks, digests.

A reader of any file tome-export writes sees the old content or the new one, never half of it: the data go to
a hidden temporary file beside the target, which is renamed into place only when complete. Whole output
directories (a build, a tune report) are written the same way: into a hidden, locked work directory that replaces
the output at the end (:func:`staged_output`), under a lock that keeps a second writer out (:func:`output_lock`).

What is not tome-export's in a replaced output directory (its caller says which entries those are) is kept: linked
into the new directory before the swap, never deleted. The swap itself defers SIGINT and SIGTERM, and a swap cut
short by SIGKILL is undone by the next build's clean-up (:func:`remove_stale_workdirs`), so an output directory
always holds the previous build or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

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

Foreign = Callable[[Path], Sequence[str]]  # an existing output -> its entries tome-export did not write (relative)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _nothing_foreign(out: Path) -> Sequence[str]:
    return ()


@contextlib.contextmanager
def staged_output(out: Path, foreign: Foreign = _nothing_foreign) -> Iterator[Path]:
    """A hidden, locked work directory beside ``out``; it replaces ``out`` when the block ends without error and
    is removed otherwise, so ``out`` is always either the previous content or the complete new one.

    ``foreign(out)`` names the entries of an existing ``out`` that are not the caller's to replace (asked at the
    swap, so files added during the work count too): they are kept in the new ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, lock = _locked_workdir(out.parent, f".{out.name}.tmp-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output should not be
        yield tmp
        _replace_dir(tmp, out, foreign)
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
    holding it leaves the file unlocked, which the next build takes over. A lock path that is a symbolic link or
    not a regular file is refused, never followed.
    """
    if fcntl is None:
        yield
        return
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"another tome-export build is writing {str(out)!r} now: wait for it to finish or "
                            f"choose another --output") from None
        if _same_file(path, fd):
            break
        os.close(fd)  # its holder released and removed it while we waited for the lock
    try:
        yield
    finally:
        if _same_file(path, fd):
            path.unlink(missing_ok=True)
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    """The lock file, created if missing, opened without following a symbolic link (nor blocking on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UserError(f"the lock file {str(path)!r} is a symbolic link, which tome-export never follows: remove "
                        f"it, then build again") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"the lock file {str(path)!r} is not a regular file: remove it, then build again")
    return fd


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` (not followed) is still the file open as ``fd``."""
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _open_directory(path: Union[str, Path]) -> int:
    """A descriptor of a directory (never of what a symbolic link points to)."""
    return os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)


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
            fd = _open_directory(path)
        except FileNotFoundError:  # a concurrent cleaner took it for stale before we locked it
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(path, fd):
            return path, fd
        os.close(fd)


def remove_stale_workdirs(parent: Path, name: str) -> None:
    """Remove the hidden work directories of earlier builds of ``name`` that were killed mid-way.

    A previous build is never lost: when ``name`` itself is missing and a stale ``.old-`` directory holds it (a
    swap killed between its two renames), it is put back in place instead.
    """
    if fcntl is None or not parent.is_dir():
        return
    pattern = glob.escape(str(parent / f".{name}."))
    for path in sorted(glob.glob(pattern + "old-*"), key=_mtime, reverse=True) + glob.glob(pattern + "tmp-*"):
        try:
            fd = _open_directory(path)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: a build in progress
            os.close(fd)
            continue
        try:
            previous, out = Path(path) / name, parent / name
            if ".old-" in Path(path).name and not (out.exists() or out.is_symlink()) and previous.exists():
                os.replace(previous, out)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _mtime(path: str) -> float:
    try:
        return os.stat(path, follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _replace_dir(tmp: Path, out: Path, foreign: Foreign = _nothing_foreign) -> None:
    """Move the finished build into place; an existing output is swapped out, then removed (what ``foreign``
    names in it is linked into the new build first)."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    if out.is_dir() and not out.is_symlink():
        carry_entries(out, tmp, foreign(out))
    old, fd = _locked_workdir(out.parent, f".{out.name}.old-")
    try:
        with deferred_signals(f"{out} was already replaced by the new content"):
            os.replace(out, old / out.name)
            os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)


def carry_entries(source: Path, destination: Path, entries: Sequence[str]) -> None:
    """Hard-link each entry (a relative path: file, link, special file or whole directory) of ``source`` into
    ``destination`` at the same place, copying regular files where links are refused. An entry whose place is
    already taken in ``destination`` is refused: it would be replaced."""
    clashes = [rel for rel in entries if os.path.lexists(destination / rel)]
    if clashes:
        raise UserError(f"{str(source / clashes[0])!r} is not tome-export's, and the new content has a file of that "
                        f"name: move it away, then try again (nothing was replaced)")
    for rel in entries:
        src, dst = source / rel, destination / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir() and not src.is_symlink():
            _carry_tree(src, dst)
        else:
            _link(src, dst)


def _carry_tree(src: Path, dst: Path) -> None:
    for root, dirs, files in os.walk(src):
        here = dst / Path(root).relative_to(src)
        here.mkdir(exist_ok=True)
        shutil.copystat(root, here, follow_symlinks=False)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            _link(Path(root) / name, here / name)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        if not stat.S_ISREG(os.lstat(src).st_mode):
            raise UserError(f"cannot keep {str(src)!r} (it cannot be linked on this file system): move it away, "
                            f"then try again (nothing was replaced)") from None
        shutil.copy2(src, dst, follow_symlinks=False)


@contextlib.contextmanager
def deferred_signals(done: str) -> Iterator[None]:
    """SIGINT and SIGTERM held back while the block runs (renames that must not be cut in half), then delivered;
    an interrupt delivered that way says ``done``: what the block had finished. Only the main thread can hold them
    (the only thread Python interrupts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    wanted = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in wanted}
    completed = False
    try:
        yield
        completed = True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            for s in caught:
                signal.raise_signal(s)
        except KeyboardInterrupt:
            if not completed:
                raise
            raise KeyboardInterrupt(done) from None
