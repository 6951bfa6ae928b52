"""Mistakes on the `python -m llama.<tool>` command lines: one `error:` line on stderr naming the
argument, exit status 2 (130 interrupted, 141 stdout closed), never a traceback, never a hang.

The main cases run the real command in a subprocess, outside the repository and without CUDA,
side by side under a timeout, so a FIFO that blocks fails rather than hangs; their variants call
the same `main` in this process, in a thread that is unblocked (and failed) should it hang.
"""
import argparse
import errno
import importlib
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import llama
import llama.model
from llama import cli
from llama.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120

pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("LLAMA_KERNELS_BACKEND", None)
    return env


def _cli(cwd, *args, **kwargs):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S, **kwargs)


def _small_checkpoint(path):
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=512, multiple_of=4, max_seq_len=64)
    llama.save(llama.model.build(cfg), path)


# (id, command, text the error line must contain). Paths are relative to the work directory set
# up in `work`: ck/ (a native checkpoint), somefile (an empty file), fifo, emptydir/, text.txt.
CASES = [
    # llama.config
    ("config-unknown-spec", ["llama.config", "nope"], "SPEC: 'nope'"),
    ("config-bad-int", ["llama.config", "stories15M", "dim=abc"], "dim: expected an integer"),
    ("config-bad-yaml-value", ["llama.config", "stories15M", "dim=["], "override: 'dim=['"),
    ("config-unknown-field", ["llama.config", "stories15M", "bogus=1"], "override: unknown field 'bogus'"),
    ("config-bad-range", ["llama.config", "stories15M", "dim=7"], "n_heads"),
    ("config-spec-dir", ["llama.config", "emptydir"], "SPEC: 'emptydir' is a directory"),
    ("config-spec-fifo", ["llama.config", "fifo"], "SPEC: 'fifo' is a FIFO"),
    # llama.generate
    ("generate-fifo", ["llama.generate", "--checkpoint", "fifo", "--device", "cpu"], "--checkpoint: 'fifo' is a FIFO"),
    ("generate-dir-no-config", ["llama.generate", "--checkpoint", "emptydir", "--device", "cpu"],
     "--checkpoint: 'emptydir' is a directory without a config.json"),
    ("generate-missing", ["llama.generate", "--checkpoint", "missing.pt"], "--checkpoint: 'missing.pt': no such file"),
    ("generate-not-a-checkpoint", ["llama.generate", "--checkpoint", "text.txt", "--tokenizer", "text.txt",
                                   "--device", "cpu"], "not a recognised checkpoint"),
    ("generate-tokenizer-dir", ["llama.generate", "--checkpoint", "ck", "--tokenizer", "emptydir"],
     "--tokenizer: 'emptydir' is a directory"),
    ("generate-no-tokenizer", ["llama.generate", "--checkpoint", "ck", "--device", "cpu"], "--tokenizer: none given"),
    ("generate-cuda", ["llama.generate", "--checkpoint", "ck", "--tokenizer", "text.txt", "--device", "cuda"],
     "--device: 'cuda'"),
    ("generate-bogus-device", ["llama.generate", "--checkpoint", "ck", "--tokenizer", "text.txt", "--device", "gpu7"],
     "--device: 'gpu7' is not a device"),
    ("generate-seed-negative", ["llama.generate", "--checkpoint", "ck", "--tokenizer", "text.txt", "--device", "cpu",
                                "--seed", "-1"], "--seed: expected an integer in [0, 2**64 - 1]"),
    ("generate-seed-too-big", ["llama.generate", "--checkpoint", "ck", "--tokenizer", "text.txt", "--device", "cpu",
                               "--seed", str(2**64)], "--seed: expected an integer in [0, 2**64 - 1]"),
    ("generate-max-new-tokens", ["llama.generate", "--checkpoint", "ck", "--tokenizer", "text.txt", "--device", "cpu",
                                 "--max-new-tokens", "-3"], "--max-new-tokens: expected >= 0"),
    ("generate-cuda-graph-cpu", ["llama.generate", "--checkpoint", "ck", "--tokenizer", "text.txt", "--device", "cpu",
                                 "--cuda-graph"], "--cuda-graph: needs a CUDA device"),
    ("generate-bad-override", ["llama.generate", "--checkpoint", "ck", "--tokenizer", "text.txt", "--device", "cpu",
                               "norm_eps=small"], "norm_eps: expected a number"),
    # llama.quantize
    ("quantize-out-is-input", ["llama.quantize", "--checkpoint", "ck", "--out", "ck"], "--out: 'ck' is the input"),
    ("quantize-out-is-input-force", ["llama.quantize", "--checkpoint", "ck", "--out", "./ck/", "--force"],
     "--out: './ck/' is the input"),
    ("quantize-out-is-input-folder", ["llama.quantize", "--checkpoint", "ck/model.safetensors", "--out", "ck",
                                      "--force"], "--out: 'ck' is the directory of the input"),
    ("quantize-out-holds-checkpoint", ["llama.quantize", "--checkpoint", "ck", "--out", "other"],
     "--out: 'other' already holds a checkpoint; pass --force"),
    ("quantize-out-not-empty", ["llama.quantize", "--checkpoint", "ck", "--out", "full"],
     "--out: 'full' is not empty"),
    ("quantize-out-is-file", ["llama.quantize", "--checkpoint", "ck", "--out", "somefile", "--force"],
     "--out: 'somefile' is a file; expected a directory"),
    ("quantize-out-under-file", ["llama.quantize", "--checkpoint", "ck", "--out", "somefile/q"],
     "--out: 'somefile/q' cannot be created: 'somefile' is a file"),
    ("quantize-fifo", ["llama.quantize", "--checkpoint", "fifo", "--out", "q"], "--checkpoint: 'fifo' is a FIFO"),
    # llama.tokenizer
    ("tokenizer-train-out-under-file", ["llama.tokenizer", "train", "--input", "text.txt", "--vocab-size", "300",
                                        "--out", "somefile/tok"], "--out: 'somefile/tok' cannot be created"),
    ("tokenizer-train-out-model-dir", ["llama.tokenizer", "train", "--input", "text.txt", "--vocab-size", "300",
                                       "--out", "tokdir"], "--out: 'tokdir/tokenizer.model' is a directory"),
    ("tokenizer-train-input-fifo", ["llama.tokenizer", "train", "--input", "fifo", "--vocab-size", "300",
                                    "--out", "tok"], "--input: 'fifo' is a FIFO"),
    ("tokenizer-train-input-missing", ["llama.tokenizer", "train", "--input", "missing.txt", "--vocab-size", "300",
                                       "--out", "tok"], "--input: 'missing.txt': no such file"),
    ("tokenizer-export-model-dir", ["llama.tokenizer", "export", "--model", "emptydir", "--out", "x.bin"],
     "--model: 'emptydir' is a directory"),
    ("tokenizer-export-out-under-file", ["llama.tokenizer", "export", "--model", "text.txt", "--out",
                                         "somefile/x.bin"], "--out: 'somefile/x.bin' cannot be written"),
    ("tokenizer-export-out-dir", ["llama.tokenizer", "export", "--model", "text.txt", "--out", "emptydir"],
     "--out: 'emptydir' is a directory"),
    # llama.data
    ("data-cache-dir-under-file", ["llama.data", "fetch-sample", "--cache-dir", "somefile/cache"],
     "--cache-dir: 'somefile/cache' cannot be created"),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _small_checkpoint(root / "ck")
    _small_checkpoint(root / "other")
    (root / "full").mkdir()
    (root / "full" / "notes.txt").write_text("mine\n")
    (root / "somefile").write_text("")
    (root / "text.txt").write_text("hello world\n")
    (root / "emptydir").mkdir()
    (root / "tokdir" / "tokenizer.model").mkdir(parents=True)
    os.mkfifo(root / "fifo")
    return root


# The cases each brief bullet names run as real commands; the other cases call the same `main` in
# this process (importing torch in a subprocess per case would take minutes on a small machine).
SUBPROCESS = {"config-unknown-spec", "config-bad-int", "generate-fifo", "generate-cuda", "quantize-out-is-input",
              "tokenizer-train-out-under-file"}


class _Result:
    def __init__(self, cmd, returncode, stderr):
        self.cmd, self.returncode, self.stderr = cmd, returncode, stderr


@pytest.fixture(scope="module")
def results(work):
    """The SUBPROCESS cases, run side by side: id -> CompletedProcess (or the TimeoutExpired)."""
    def one(case):
        try:
            return _cli(work, *case[1])
        except subprocess.TimeoutExpired as exc:
            return exc
    chosen = [c for c in CASES if c[0] in SUBPROCESS]
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip((c[0] for c in chosen), pool.map(one, chosen)))


def _in_process(argv, work, capsys, monkeypatch):
    """`python -m TOOL ARGS...` as a call of the tool's main, in a thread: should it block on the
    FIFO, the FIFO gets a writer (which unblocks it) and the case fails as hung."""
    monkeypatch.chdir(work)
    main = importlib.import_module(f"{argv[0]}.__main__").main
    out = {}

    def call():
        try:
            out["code"] = main(argv[1:])
        except SystemExit as exc:
            out["code"] = exc.code
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    if thread.is_alive():
        fd = os.open(work / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(10)
        return subprocess.TimeoutExpired(argv, TIMEOUT_S)
    return _Result(argv, out.get("code"), capsys.readouterr().err)


def _assert_error(result, expected, code=2):
    assert not isinstance(result, subprocess.TimeoutExpired), f"hung: {result.cmd}"
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert expected in lines[-1], lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1, result.stderr


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_error_line(case, work, capsys, monkeypatch, request):
    name, argv, expected = case
    if name in SUBPROCESS:
        result = request.getfixturevalue("results")[name]
    else:
        result = _in_process(argv, work, capsys, monkeypatch)
    _assert_error(result, expected)


def test_nothing_written_on_refusal(results, work):
    """After every case (this test runs after them)."""
    assert not (work / "q").exists() and not (work / "tok").exists() and not (work / "x.bin").exists()
    assert sorted(p.name for p in (work / "full").iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in (work / "ck").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    locked = tmp_path / "locked.pt"
    locked.write_bytes(b"\0" * 64)
    locked.chmod(0)
    try:
        _assert_error(_cli(tmp_path, "llama.generate", "--checkpoint", "locked.pt", "--device", "cpu"),
                      "--checkpoint: 'locked.pt': cannot read it (permission denied)")
        _assert_error(_cli(tmp_path, "llama.config", "locked.pt"), "SPEC: 'locked.pt': cannot read it")
    finally:
        locked.chmod(0o600)


def test_unreadable_and_unwritable_as_any_user(tmp_path, monkeypatch):
    """The permission checks, with the refusal simulated (root would read and write anyway)."""
    (tmp_path / "model.pt").write_bytes(b"\0" * 64)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(cli.UsageError, match=r"^--checkpoint: '.*model.pt': cannot read it \(permission denied\)$"):
        cli.checkpoint_path(str(tmp_path / "model.pt"))
    monkeypatch.undo()
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(cli.UsageError, match=r"^--out: '.*new/sub': permission denied \(cannot write in"):
        cli.output_dir(str(tmp_path / "new" / "sub"), "--out")
    with pytest.raises(cli.UsageError, match=r"^--out: '.*x.bin': permission denied"):
        cli.output_file(str(tmp_path / "x.bin"), "--out")


def test_quantize_force(tmp_path):
    """--force replaces a checkpoint in --out (the positive control of the refusal above)."""
    _small_checkpoint(tmp_path / "ck")
    _small_checkpoint(tmp_path / "out")
    (tmp_path / "out" / "tokenizer.bin").write_bytes(b"old model's")  # not the new model's: removed
    forced = _cli(tmp_path, "llama.quantize", "--checkpoint", "ck", "--out", "out", "--group-size", "32", "--force")
    assert forced.returncode == 0 and "Traceback" not in forced.stderr, forced.stderr
    assert "wrote out" in forced.stdout
    assert llama.quantize.is_quantized(llama.load(tmp_path / "out", device="cpu").model)
    assert not (tmp_path / "out" / "tokenizer.bin").exists()


def test_closed_stdout(tmp_path):
    """The reader of stdout went away: no traceback, nothing on stderr, status 141."""
    proc = subprocess.Popen([sys.executable, "-m", "llama.config", "llama2-7b"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == cli.EXIT_BROKEN_PIPE, err.decode()
    assert err.decode() == ""


def test_argparse_errors_exit_2(capsys):
    from llama.quantize.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", "ck", "--out", "q", "--bogus"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage:") and "error: unrecognized arguments: --bogus" in err


# --- how `cli.run` maps what the body raises (in process: a Ctrl-C cannot be timed in a subprocess) ---

def _parse(argv):
    return argparse.Namespace()


@pytest.mark.parametrize("exc, code, text", [
    (KeyboardInterrupt(), 130, "error: interrupted"),
    (PermissionError(errno.EACCES, "Permission denied", "model.pt"), 2, "error: model.pt: Permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "out"), 2, "error: out: Is a directory"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "f/x"), 2, "error: f/x: Not a directory"),
    (MemoryError(), 2, "error: out of memory"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), 2,
     "error: out of memory"),
    (ValueError("top_p: expected a probability\nin (0, 1]"), 2, "error: top_p: expected a probability in (0, 1]"),
])
def test_run_maps(exc, code, text, capsys):
    def body(args):
        raise exc
    assert cli.run(_parse, body, []) == code
    err = capsys.readouterr().err
    assert err.startswith(text) and err.count("\n") == 1, err


def test_run_keeps_bugs_loud():
    def body(args):
        raise RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.run(_parse, body, [])
