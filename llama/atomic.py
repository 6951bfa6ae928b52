"""Atomic writes: a file or a directory appears at its path complete, or the old one stays.

    with atomic_file(path) as tmp:           # write `tmp` any way you like (torch.save, open(...))
        torch.save(obj, tmp)
    write_bytes(path, data)                  # the same for bytes already in memory
    write_dir(path, {"model.safetensors": save_weights, "config.json": save_config})

Checkpoints, tokenizers and the sample data all write through here.

Files. A file is written under a hidden temporary name beside its final name
(`.NAME.XXXXXXXX.tmp`), flushed to disk and renamed over the final name in one step; if anything
fails, the temporary file is removed and what was at the path before is untouched.

Directories. The complete new directory is assembled under a hidden temporary name beside the
target (`.NAME.XXXXXXXX.tmp`): the files being written, plus the files of the old directory that
are kept (hard links, or copies where the filesystem refuses links). Every file and the directory
are flushed to disk, then the new directory is exchanged with the old one in a single step
(Linux renameat2 with RENAME_EXCHANGE) and the old one, now under the temporary name, is removed.
A reader, or a crash at any point, sees the whole old directory or the whole new one at the path,
never a mix of the two. A directory that did not exist is renamed into place (also one step).
Kept files: those of the old directory that this write does not produce, except those that
`stale(name)` picks (an earlier write's leftovers, such as shards of another split) and hidden
temporary files of interrupted writes. Files written into the directory by another program
while a save runs are not carried over. The old directory's permissions are kept; a new one gets
those mkdir would give (`dir_mode`), and new files those a plain open() would give under the
current umask (`file_mode`), not mkstemp's 0o600.

Fallback. Where the exchange is not available (not Linux, an old kernel, or a filesystem that
refuses it with EINVAL), the old directory is first renamed to `.NAME.bak.tmp`, then the new one
to NAME, then the backup is removed. A crash between those two renames leaves nothing at NAME
and the complete old directory in the backup: the next write to NAME (or `recover(NAME)`) puts
it back before doing anything else. A crash after them leaves the new directory in place and a
stale backup that the next write removes. The mix of old and new never appears at the path.

Exclusion. Each write holds an exclusive lock (flock) on a hidden file beside the target,
`.NAME.lock`, removed when the write ends. A second write to the same path while one is in
progress fails at once with SaveInProgressError (a RuntimeError that names the path) rather
than waiting. Under the lock, each write first removes what an interrupted write to the same
path left behind (its `.NAME.XXXXXXXX.tmp` files or directories, a stale lock file, a fallback
backup); a live writer's files are never touched, since it holds the lock. Loaders never see
these names: they are hidden and lie beside the checkpoint, not inside it. Where fcntl is missing
(Windows) or the filesystem refuses locks, writes go on without a lock and without removing
other writers' leftovers.

A directory that is itself a mount point cannot be exchanged or renamed: saving to it is an
OSError that says so (save into a directory inside it instead).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Union

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writes go on unlocked (see the module docstring)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SaveInProgressError", "atomic_file", "dir_mode", "file_mode", "fsync_dir", "fsync_file", "recover",
    "temp_path", "umask", "write_bytes", "write_dir", "write_json",
]

PathLike = Union[str, "os.PathLike[str]"]
Writer = Callable[[Path], None]  # writes one file at the path it is given

# Names of the hidden helpers of a write to NAME, all in the directory that holds NAME.
# Temporary files and directories: `.NAME.` + 8 characters of tempfile's alphabet + `.tmp`.
# The fixed width keeps the names of two different targets apart (`.a.b.XXXXXXXX.tmp` belongs
# to `a.b`, never to `a`), so a write cleans up only what belongs to its own path.
_TEMP_SUFFIX = ".tmp"
_RANDOM = r"[a-z0-9_]{8}"
_ANY_TEMP = re.compile(r"\..+\." + _RANDOM + re.escape(_TEMP_SUFFIX))  # any write's temporary


class SaveInProgressError(RuntimeError):
    """Another write to the same path holds its lock."""


def _after_step(what: str) -> None:
    """Called after each step that changes the filesystem (for tests that stop a write there)."""


def _step(what: str) -> None:
    _after_step(what)


def umask() -> int:
    """The process's current umask.

    Read from /proc where the platform has it, which changes nothing; elsewhere it is set and put
    back at once (os.umask is the only portable way to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a file that open() would create now (mkstemp makes 0o600 instead)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """Permissions of a directory that mkdir would create now (mkdtemp makes 0o700 instead)."""
    return 0o777 & ~umask()


def fsync_file(path: PathLike) -> None:
    """Flush a written file to disk."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Flush a directory's entries (renames) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(directory: PathLike, name: str) -> Path:
    """A new empty file in `directory`, hidden and named after `name`, for writing `name` in full."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=_TEMP_SUFFIX, dir=directory)
    os.close(fd)
    _step(f"create {tmp}")
    return Path(tmp)


# ----------------------------------------------------------------------------- helper names
def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _backup_path(path: Path) -> Path:
    return path.parent / f".{path.name}.bak{_TEMP_SUFFIX}"


def _temp_pattern(path: Path) -> re.Pattern:
    return re.compile(re.escape(f".{path.name}.") + _RANDOM + re.escape(_TEMP_SUFFIX))


# ----------------------------------------------------------------------------- the lock
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold the lock of writes to `path`; yields whether a lock is held (False where the platform
    or filesystem has none). SaveInProgressError if another write holds it.

    The lock file is removed on release. A writer that opened it just before then may lock the
    removed file; it sees that the file at the lock's path is not the one it locked, and tries again.
    """
    if fcntl is None:
        yield False
        return
    lock = _lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        _step(f"open {lock}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SaveInProgressError(
                f"{path}: another save to this path is in progress (it holds the lock {lock.name}); "
                "wait for it to finish, or save elsewhere") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL):
                raise
            with contextlib.suppress(OSError):
                os.unlink(lock)
            fd = -1  # the filesystem has no locks: go on unlocked
            break
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # we locked a lock file that its last holder had already removed
    if fd < 0:
        yield False
        return
    try:
        yield True
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass
        else:
            _step(f"unlink {lock}")
        os.close(fd)


# ----------------------------------------------------------------------------- removing
def _remove(path: Path) -> None:
    """Remove a file, a symlink or a whole tree (never following links), one entry at a time."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        with os.scandir(path) as entries:
            children = [Path(e.path) for e in entries]
        for child in children:
            _remove(child)
        os.rmdir(path)
        _step(f"rmdir {path}")
    else:
        os.unlink(path)
        _step(f"unlink {path}")


def _clean_leftovers(path: Path) -> None:
    """Remove what interrupted writes to `path` left beside it; call only under the lock.

    A fallback backup is put back first when nothing is at `path` (see the module docstring)."""
    backup = _backup_path(path)
    if os.path.lexists(backup):
        if os.path.lexists(path):
            _remove(backup)  # the new directory made it into place; the old one is not needed
        else:
            os.rename(backup, path)  # interrupted between the two renames: the old one goes back
            _step(f"rename {backup} -> {path}")
        fsync_dir(path.parent)
    pattern = _temp_pattern(path)
    try:
        with os.scandir(path.parent) as entries:
            leftovers = [Path(e.path) for e in entries if pattern.fullmatch(e.name)]
    except FileNotFoundError:
        return
    for leftover in leftovers:
        _remove(leftover)


def recover(path: PathLike) -> Path:
    """Finish what an interrupted write to `path` left: put back a directory that a fallback
    swap had moved aside, and remove temporary files and directories; returns the path.

    Writes do this themselves before writing; a reader may call it when `path` is missing.
    SaveInProgressError if a write to `path` is in progress.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return path
    with _locked(path) as locked:
        if locked:
            _clean_leftovers(path)
    return path


# ----------------------------------------------------------------------------- single files
@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the body has written it, fsync it and rename it
    over `path`. If the body fails, the temporary file is removed and `path` is untouched.

    The write holds the lock of `path` and first removes an interrupted write's temporary files
    (see the module docstring); SaveInProgressError if another write to `path` is in progress.
    The parent directory is created when missing. ValueError if `path` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected the path of a file")
    _make_parent(path)
    with _locked(path) as locked:
        if locked:
            _clean_leftovers(path)
        tmp = temp_path(path.parent, path.name)
        try:
            yield tmp
            _step(f"write {tmp}")
            fsync_file(tmp)
            _step(f"fsync {tmp}")
            os.chmod(tmp, file_mode())
            _step(f"chmod {tmp}")
            os.replace(tmp, path)
            _step(f"rename {tmp} -> {path}")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
        _step(f"fsync {path.parent}")


def write_bytes(path: PathLike, data: Union[bytes, bytearray, memoryview]) -> Path:
    """Write `data` to `path` atomically (see atomic_file); returns the path."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_json(path: PathLike, obj) -> Path:
    """Write `obj` to `path` as indented UTF-8 JSON with a final newline, atomically."""
    return write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def _make_parent(path: Path) -> None:
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        _step(f"mkdir {path.parent}")


# ----------------------------------------------------------------------------- directories
def write_dir(path: PathLike, files: Mapping[str, Writer],
              stale: Callable[[str], bool] = lambda name: False) -> Path:
    """Write `files` (name -> writer) as directory `path`, replacing what was there in one step;
    returns the path.

    The new directory is assembled in full under a hidden temporary name beside `path`: each
    writer writes its file, then the files of the old directory that are kept (all but those this
    write produces, those `stale(name)` picks, and temporary files of interrupted writes) are
    linked or copied in; then it takes the old one's place at once (see the module docstring).
    If a writer fails, the temporary directory is removed and `path` is untouched.
    SaveInProgressError if another write to `path` is in progress. ValueError if `path` exists
    and is not a directory, or a name in `files` is not a plain file name; OSError if `path` is
    a mount point.
    """
    path = Path(path)
    for name in files:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise ValueError(f"{path}: {name!r} is not a plain file name")
    if path.is_symlink() and path.is_dir():
        path = Path(os.path.realpath(path))  # replace the directory the link points at, keep the link
    if os.path.lexists(path) and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory")
    _make_parent(path)
    with _locked(path) as locked:
        if locked:
            _clean_leftovers(path)
        old: Optional[os.stat_result] = os.stat(path) if path.is_dir() else None
        if old is not None and old.st_dev != os.stat(path.parent).st_dev:
            raise OSError(errno.EXDEV, f"{path}: is a mount point, so it cannot be replaced in one step; "
                                       "save into a directory inside it")
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent))
        _step(f"mkdir {staging}")
        try:
            for name, write in files.items():
                write(staging / name)
                _step(f"write {staging / name}")
                fsync_file(staging / name)
                _step(f"fsync {staging / name}")
                os.chmod(staging / name, file_mode())
                _step(f"chmod {staging / name}")
            if old is not None:
                with os.scandir(path) as entries:
                    kept = [e.name for e in entries
                            if e.name not in files and not stale(e.name) and not _ANY_TEMP.fullmatch(e.name)]
                for name in sorted(kept):
                    _carry(path / name, staging / name)
            os.chmod(staging, stat.S_IMODE(old.st_mode) if old is not None else dir_mode())
            _step(f"chmod {staging}")
            fsync_dir(staging)
            _step(f"fsync {staging}")
            if old is None:
                os.rename(staging, path)
                _step(f"rename {staging} -> {path}")
                replaced = None
            else:
                replaced = _swap(staging, path)
        except BaseException:
            _remove(staging)  # the unfinished new directory (or, after a swap, the old one)
            raise
        fsync_dir(path.parent)
        _step(f"fsync {path.parent}")
        if replaced is not None:
            _remove(replaced)
    return path


def _carry(src: Path, dst: Path) -> None:
    """Put `src` (a file, link or directory of the old directory) at `dst` in the new one."""
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
        _step(f"symlink {dst}")
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dst)
        _step(f"mkdir {dst}")
        with os.scandir(src) as entries:
            names = sorted(e.name for e in entries)
        for name in names:
            _carry(src / name, dst / name)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        _step(f"chmod {dst}")
        fsync_dir(dst)
    elif stat.S_ISREG(st.st_mode):
        try:
            os.link(src, dst)
            _step(f"link {src} -> {dst}")
        except OSError:  # no hard links here (another filesystem, FAT, a link limit): copy it
            shutil.copy2(src, dst)
            _step(f"copy {src} -> {dst}")
            fsync_file(dst)
            _step(f"fsync {dst}")
    else:
        raise ValueError(f"{src}: neither a file, a directory nor a symlink, so it cannot be kept "
                         "in the new directory; move it away and save again")


def _swap(new: Path, path: Path) -> Path:
    """Put directory `new` at `path`; returns where the old directory now is. In one step where
    the platform can exchange them, else by two renames through the backup name."""
    if _exchange(new, path):
        _step(f"exchange {new} <-> {path}")
        return new
    backup = _backup_path(path)
    os.rename(path, backup)
    _step(f"rename {path} -> {backup}")
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(backup, path)
        raise
    _step(f"rename {new} -> {path}")
    return backup


# ----------------------------------------------------------------------------- renameat2
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _load_renameat2() -> Optional[Callable[[bytes, bytes, int], int]]:
    """renameat2(AT_FDCWD, old, AT_FDCWD, new, flags) from the C library, or by its system call
    number where the library lacks it (glibc before 2.28); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda old, new, flags: fn(_AT_FDCWD, old, _AT_FDCWD, new, flags)
    number = _SYS_RENAMEAT2.get(platform.machine().lower())
    syscall = getattr(libc, "syscall", None)
    if number is None or syscall is None:
        return None
    syscall.restype = ctypes.c_long
    return lambda old, new, flags: syscall(ctypes.c_long(number), ctypes.c_long(_AT_FDCWD), ctypes.c_char_p(old),
                                           ctypes.c_long(_AT_FDCWD), ctypes.c_char_p(new), ctypes.c_long(flags))


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Exchange the entries `a` and `b` in one step; False where the platform or filesystem
    cannot (then nothing changed)."""
    if _renameat2 is None:
        return False
    import ctypes
    if _renameat2(os.fsencode(a), os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, f"cannot exchange the directories: {os.strerror(err)}", str(a), None, str(b))
