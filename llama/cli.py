"""What every `python -m llama.<tool>` shares: how a run ends, and checks of its arguments.

Exit status, the same for every tool:

    0    done
    1    could not be done for a reason outside the command line (llama.data: the sample
         cannot be downloaded, or the download does not match its checksum; another process is
         saving to the same output; llama.train: the loss diverged)
    2    a mistake in the command line: a bad option value, a path that is missing, unreadable,
         of the wrong kind (a directory, a FIFO) or unwritable, an output that would replace a
         checkpoint, a size that does not fit in memory; argparse's own errors (an unknown or
         missing option) exit 2 too, with its usage line
    130  interrupted (Ctrl-C)
    141  stdout was closed early (`... | head`): the tool stops silently, as a program killed by
         SIGPIPE would, and writes nothing more

Each error is one line on stderr, `error: WHAT: ...`, naming the argument (or the file) at fault;
no traceback. Exceptions that are not about the input (bugs) keep their traceback.

The checks (`input_path`, `output_dir`, `output_file`, `device`, `seed`, `check_overrides`) run
before any long work, so a bad output path is reported before a model is loaded or trained. They
never open anything but a regular file, so a FIFO cannot block a tool.
"""
from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import typing
from pathlib import Path
from typing import Callable, Optional, Sequence

from .atomic import SaveInProgressError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes a uint64


class UsageError(ValueError):
    """A bad command-line value; its message is the `error:` line."""


def error(message: str) -> None:
    """Print `error: message` as one line on stderr."""
    _stderr_line(f"error: {message}")


def warning(message: str) -> None:
    _stderr_line(f"warning: {message}")


def _stderr_line(text: str) -> None:
    text = re.sub(r"\s*\n\s*", " ", text.strip())
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed as well: nowhere to say it
        pass


def describe(exc: BaseException) -> str:
    """An exception as the text of an `error:` line."""
    if isinstance(exc, OSError) and exc.strerror:
        names = [os.fsdecode(n) for n in (exc.filename, exc.filename2) if n is not None]
        return f"{' -> '.join(names)}: {exc.strerror}" if names else exc.strerror
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + str(exc) if str(exc) else ''}; ask for less (a smaller size or batch)"
    text = str(exc).strip()
    if isinstance(exc, KeyError) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def _out_of_memory(exc: RuntimeError) -> bool:
    """torch's allocation failures are RuntimeErrors (CUDA's is torch.OutOfMemoryError)."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (oom is not None and isinstance(exc, oom)) or "can't allocate memory" in str(exc)


def _stdout_gone() -> int:
    # Python's advice (signal module docs, "Note on SIGPIPE"): point stdout at devnull so that
    # the flush at interpreter exit does not raise a second BrokenPipeError.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    return EXIT_BROKEN_PIPE


def run(parse: Callable[[Optional[Sequence[str]]], argparse.Namespace],
        body: Callable[[argparse.Namespace], int], argv: Optional[Sequence[str]] = None) -> int:
    """Parse the command line and run `body` on it; returns the exit status (see above)."""
    try:
        args = parse(argv)  # argparse's errors exit 2 by themselves
        status = body(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        return _stdout_gone()
    except SaveInProgressError as exc:  # another process writes the same output: not a bug
        error(describe(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError, MemoryError) as exc:
        error(describe(exc))
        return EXIT_USAGE
    except RuntimeError as exc:
        if not _out_of_memory(exc):
            raise  # a bug, not a bad input: keep the traceback
        detail = re.sub(r"^\[enforce fail at [^]]*\]( err == 0\.)?\s*", "", describe(exc))
        error(f"out of memory: {detail}")
        return EXIT_USAGE


# ---------------------------------------------------------------------------- argument checks

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _stat(path: Path, option: str) -> Optional[os.stat_result]:
    """os.stat, or None if nothing is there."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        raise UsageError(f"{option}: {str(path)!r}: permission denied (cannot look it up)") from None
    except OSError as exc:
        raise UsageError(f"{option}: {str(path)!r}: {exc.strerror or exc}") from None


def input_path(value: str, option: str, *, directory: bool = False, what: str = "file") -> Path:
    """An existing, readable regular file (or, with `directory`, also a readable directory).

    Anything else (missing, a FIFO, a socket, a directory where a file is expected, no read
    permission) is a UsageError naming `option`. Nothing but a regular file is opened.
    """
    path = Path(value)
    st = _stat(path, option)
    expected = f"a {what} or a directory" if directory else f"a {what}"
    if st is None:
        raise UsageError(f"{option}: {value!r}: no such file or directory (expected {expected})")
    if stat.S_ISDIR(st.st_mode):
        if not directory:
            raise UsageError(f"{option}: {value!r} is a directory; expected {expected}")
        try:
            os.listdir(path)
        except OSError as exc:
            raise UsageError(f"{option}: {value!r}: cannot read the directory ({exc.strerror or exc})") from None
        return path
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{option}: {value!r} is {_kind(st.st_mode)}; expected {expected}")
    try:  # O_NONBLOCK: should the path have become a FIFO meanwhile, this does not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        os.close(fd)
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise UsageError(f"{option}: {value!r}: cannot read it ({reason})") from None
    return path


def checkpoint_path(value: str, option: str = "--checkpoint") -> Path:
    """A checkpoint to load: a readable file, or a directory with a config.json."""
    path = input_path(value, option, directory=True, what="checkpoint file")
    if path.is_dir():
        config = path / "config.json"
        st = _stat(config, option)
        if st is None or not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{option}: {value!r} is a directory without a config.json file; expected a "
                             "checkpoint file, or a native or Hugging Face checkpoint directory")
        input_path(str(config), option)
    return path


def _writable_dir(path: Path, value: str, option: str) -> None:
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: {value!r}: permission denied (cannot write in {str(path)!r})")


def _creatable(path: Path, value: str, option: str) -> None:
    """The nearest existing ancestor of the missing `path` is a writable directory."""
    for parent in path.parents:  # relative ones end at ".": the working directory
        st = _stat(parent, option)
        if st is None:
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{option}: {value!r} cannot be created: {str(parent)!r} is "
                             f"{_kind(st.st_mode)}, not a directory")
        _writable_dir(parent, value, option)
        return


def output_dir(value: str, option: str) -> Path:
    """A directory to write into: an existing writable one, or one that can be created."""
    path = Path(value)
    st = _stat(path, option)
    if st is None:
        _creatable(path, value, option)
    elif not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{option}: {value!r} is {_kind(st.st_mode)}; expected a directory")
    else:
        _writable_dir(path, value, option)
    return path


def output_file(value: str, option: str, *, parent_must_exist: bool = False) -> Path:
    """A file to write (replaced if it is there): not a directory or a special file, and its
    directory exists (or, unless `parent_must_exist`, can be created) and is writable."""
    path = Path(value)
    st = _stat(path, option)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{option}: {value!r} is {_kind(st.st_mode)}; expected a file to write")
    parent = path.parent
    pst = _stat(parent, option)
    if pst is None:
        if parent_must_exist:
            _creatable(parent, value, option)  # says so when an ancestor is a file
            raise UsageError(f"{option}: {value!r}: directory {str(parent)!r} does not exist")
        _creatable(parent, value, option)
    elif not stat.S_ISDIR(pst.st_mode):
        raise UsageError(f"{option}: {value!r} cannot be written: {str(parent)!r} is "
                         f"{_kind(pst.st_mode)}, not a directory")
    else:
        _writable_dir(parent, value, option)
    return path


def device(value: Optional[str], option: str = "--device") -> str:
    """A torch device string that works here (None: cuda if available, else cpu)."""
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{option}: {value!r} is not a device; expected cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return value
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise UsageError(f"{option}: {value!r}: this PyTorch build has no CUDA support; use --device cpu")
        if not torch.cuda.is_available():
            raise UsageError(f"{option}: {value!r}: no CUDA device is available; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"{option}: {value!r}: no such CUDA device; there are {count} "
                             f"(cuda:0 to cuda:{count - 1})")
        return value
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"{option}: {value!r}: MPS is not available here; use --device cpu")
        return value
    raise UsageError(f"{option}: {value!r}: device type {dev.type!r} is not supported; expected cpu, cuda or cuda:N")


def seed(value: Optional[int], option: str = "--seed") -> Optional[int]:
    if value is not None and not 0 <= value <= SEED_MAX:
        raise UsageError(f"{option}: expected an integer in [0, 2**64 - 1], got {value}")
    return value


def check_overrides(items: Sequence[str]) -> None:
    """`key=value` config overrides: known keys, values YAML can read, of the field's type."""
    from .config import ModelConfig, parse_overrides, type_problem

    hints = typing.get_type_hints(ModelConfig)
    for item in items:
        for key, value in parse_overrides([item]).items():
            expected = type_problem(value, hints[key])
            if expected is not None:
                raise UsageError(f"override: {key}: expected {expected}, got {value!r} (from {item!r})")
