"""Atomic writes: a file or a directory appears at its path complete, or the old one stays.

    with atomic_file(path) as tmp:           # write `tmp` any way you like (torch.save, open(...))
        torch.save(obj, tmp)
    write_bytes(path, data)                  # the same for bytes already in memory
    write_dir(path, {"model.safetensors": save_weights, "config.json": save_config})

A file is written under a temporary name in the directory it belongs to, flushed to disk and
renamed over its final name; if anything fails, the temporary file is removed and what was at
the path before is untouched. Files get the permissions a plain open() would give under the
current umask (`file_mode`), not mkstemp's 0o600. Checkpoints, tokenizers and the sample data
all write through here.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Union

__all__ = [
    "atomic_file", "dir_mode", "file_mode", "fsync_dir", "fsync_file", "temp_path", "umask", "write_bytes",
    "write_dir",
]

PathLike = Union[str, "os.PathLike[str]"]
Writer = Callable[[Path], None]  # writes one file at the path it is given


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
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the body has written it, fsync it and rename it
    over `path`. If the body fails, the temporary file is removed and `path` is untouched.

    The parent directory is created when missing. ValueError if `path` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected the path of a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path.parent, path.name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: PathLike, data: Union[bytes, bytearray, memoryview]) -> Path:
    """Write `data` to `path` atomically (see atomic_file); returns the path."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_dir(path: PathLike, files: Mapping[str, Writer],
              stale: Callable[[str], bool] = lambda name: False) -> Path:
    """Write `files` (name -> writer) into directory `path` so that a failure leaves what was
    there before; returns the path.

    A new directory is assembled under a temporary name and renamed into place. In an existing
    directory every file is first written in full beside its final name, then the files are
    renamed into place in the order given (put the file that marks the directory complete, such
    as a config, last); then files there that `stale(name)` picks and this write did not produce
    are removed (an earlier write's leftovers). Other files already there are kept.
    ValueError if `path` exists and is not a directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            for name, write in files.items():
                write(staging / name)
                fsync_file(staging / name)
                os.chmod(staging / name, file_mode())
            os.chmod(staging, dir_mode())
            fsync_dir(staging)
            os.rename(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(path.parent)
        return path

    staged: list[tuple[Path, Path]] = []
    try:
        for name, write in files.items():
            tmp = temp_path(path, name)
            staged.append((tmp, path / name))
            write(tmp)
            fsync_file(tmp)
            os.chmod(tmp, file_mode())
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    for old in path.iterdir():
        if stale(old.name) and old.name not in files:
            old.unlink()
    fsync_dir(path)
    return path
