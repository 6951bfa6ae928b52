"""Saves are atomic under crashes and exclude each other (llama.atomic).

The crash tests stop a save after each single filesystem step in turn (llama.atomic calls its
`_after_step` hook after every one; the child process exits there with os._exit, as a kill would
leave it) and check that the path then holds exactly the old checkpoint or exactly the new one,
as loaded and byte for byte (a torch file is compared as loaded only: torch.save names the folder
inside it after the temporary file), and that the next save succeeds and removes every leftover. One
driver process runs all of them, forking a child per stopping point, so torch is imported once.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

import llama
from llama import atomic
from llama import checkpoint as ck
from llama.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]

# case -> (format, save options for the old and the new model, directory, swap by renames)
CASES = {
    "native": ("native", {}, {}, True, False),
    "hf": ("hf", {}, {}, True, False),
    "hf-sharded": ("hf", {"max_shard_bytes": 40_000}, {"max_shard_bytes": 25_000}, True, False),
    "hf-sharded-to-single": ("hf", {"max_shard_bytes": 25_000}, {}, True, False),
    "llama2c-pt": ("llama2c-pt", {}, {}, False, False),
    "minllama-pt": ("minllama-pt", {}, {}, False, False),
    "llama2c-bin-v0": ("llama2c-bin-v0", {}, {}, False, False),
    "llama2c-bin-v1": ("llama2c-bin-v1", {}, {}, False, False),
    "llama2c-bin-v2": ("llama2c-bin-v2", {}, {}, False, False),
    "native-fallback": ("native", {}, {}, True, True),
    "hf-sharded-fallback": ("hf", {"max_shard_bytes": 40_000}, {"max_shard_bytes": 25_000}, True, True),
}
KEPT = {"tokenizer.model": b"a tokenizer", "extra/notes.txt": b"notes"}  # unrelated files in a checkpoint directory


def tiny(fmt: str, new: bool) -> llama.Transformer:
    """The old (new=False) or new model: they differ in depth, GQA, weights and, where the
    format can hold it, rope_theta."""
    flexible = fmt in ("native", "hf")
    cfg = ModelConfig(dim=32, n_layers=3 if new else 2, n_heads=4, n_kv_heads=2 if new else 4, vocab_size=64,
                      max_seq_len=32, tie_embeddings=fmt == "minllama-pt" or (new and fmt != "hf"),
                      rope_theta=500_000.0 if new and flexible else 10_000.0)
    torch.manual_seed(2 if new else 1)
    model = llama.build(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def snapshot(path: Path) -> dict:
    """Every file under `path` (or `path` itself) by relative name, with its bytes."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def same_model(loaded: llama.Transformer, model: llama.Transformer) -> bool:
    a, b = loaded.config, model.config
    if (a.dim, a.n_layers, a.n_kv_heads, a.rope_theta, a.tie_embeddings) != \
            (b.dim, b.n_layers, b.n_kv_heads, b.rope_theta, b.tie_embeddings):
        return False
    sa, sb = loaded.state_dict(), model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


# ----------------------------------------------------------------------------- the crash driver
def _prepare(ws: Path, name: str, model, fmt: str, options: dict, directory: bool) -> Path:
    if ws.exists():
        shutil.rmtree(ws)
    ws.mkdir(parents=True)
    target = ws / name
    ck.save(model, target, fmt, **options)
    if directory:
        for rel, data in KEPT.items():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            (target / rel).write_bytes(data)
    return target


def _restore(ws: Path, reference: Path) -> Path:
    """`ws` holding only a copy of `reference` (hard links: saves never change a file in place)."""
    if ws.exists():
        shutil.rmtree(ws)
    ws.mkdir(parents=True)
    target = ws / reference.name
    if reference.is_dir():
        shutil.copytree(reference, target, copy_function=os.link)
    else:
        os.link(reference, target)
    return target


def _save_in_child(model, target: Path, fmt: str, options: dict, stop_at: int, fallback: bool) -> int:
    """Save in a forked child that exits after step `stop_at`; its exit status (9: stopped)."""
    pid = os.fork()
    if pid == 0:
        try:
            steps = [0]

            def stop(what):
                steps[0] += 1
                if steps[0] == stop_at:
                    os._exit(9)

            atomic._after_step = stop
            if fallback:
                atomic._renameat2 = None
            ck.save(model, target, fmt, **options)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _crash_case(case: str, root: Path) -> dict:
    fmt, old_options, new_options, directory, fallback = CASES[case]
    name = "ckpt" if directory else "model.bin"
    new_model = tiny(fmt, True)
    expected_old = _prepare(root / "expect-old", name, tiny(fmt, False), fmt, old_options, directory)
    expected_new = _prepare(root / "expect-new", name, new_model, fmt, new_options, directory)
    old_snap, new_snap = snapshot(expected_old), snapshot(expected_new)
    old, new = ck.load_model(expected_old), ck.load_model(expected_new)  # as loaded (v2 is lossy)
    assert old_snap != new_snap
    ws = root / "work"

    def same_bytes(seen: dict, expected: dict) -> bool:
        if fmt.endswith("-pt"):  # torch.save names the archive's folder after the (temporary) file
            return len(seen) == 1 and seen["."].startswith(b"PK")
        return seen == expected

    result = {"case": case, "stops": 0, "old": 0, "new": 0, "recovered": 0, "errors": [], "steps": []}

    def fail(message):
        result["errors"].append(f"stop {stop_at}: {message}")

    if fallback:
        atomic._renameat2 = None
    steps: list[str] = []
    target = _restore(ws, expected_old)
    atomic._after_step = steps.append
    ck.save(new_model, target, fmt, **new_options)
    atomic._after_step = lambda what: None
    result["steps"] = [s.split()[0] for s in steps]
    for stop_at in range(1, 1000):
        target = _restore(ws, expected_old)
        status = _save_in_child(new_model, target, fmt, new_options, stop_at, fallback)
        if status not in (0, 9):
            fail(f"the save failed with exit status {status}")
            break
        if not os.path.lexists(target):
            if not fallback:
                fail("nothing at the path")
                continue
            atomic.recover(target)  # what the next save does first
            result["recovered"] += 1
            if not os.path.lexists(target):
                fail("nothing at the path, even after recover()")
                continue
        seen = snapshot(target)
        try:
            loaded = ck.load_model(target)
        except Exception as e:
            fail(f"the checkpoint at the path does not load: {e}")
            loaded = None
        if loaded is None:
            pass
        elif same_bytes(seen, old_snap) and same_model(loaded, old):
            result["old"] += 1
        elif same_bytes(seen, new_snap) and same_model(loaded, new):
            result["new"] += 1
        else:
            fail(f"neither the old nor the new checkpoint at the path: {sorted(seen)}")
        if status == 0:
            if not same_bytes(seen, new_snap):
                fail("the save completed but the new checkpoint is not at the path")
            if sorted(os.listdir(ws)) != [name]:
                fail(f"left beside the checkpoint: {sorted(os.listdir(ws))}")
            break
        result["stops"] += 1
        try:  # the next save succeeds and removes what the stopped one left
            ck.save(new_model, target, fmt, **new_options)
        except Exception as e:
            fail(f"the next save failed: {e!r}")
            continue
        if sorted(os.listdir(ws)) != [name]:
            fail(f"left after the next save: {sorted(os.listdir(ws))}")
        if not same_bytes(snapshot(target), new_snap):
            fail("the next save did not write the new checkpoint")
    else:
        fail("the save never completed")
    atomic._renameat2 = atomic._load_renameat2()
    return result


def crash_driver(root: str, cases: list[str]) -> None:
    """Entry point of the driver process: one JSON line per case on stdout."""
    torch.set_num_threads(1)
    os.fsync = lambda fd: None  # a killed process loses nothing it wrote (a power cut would): skip the flushes
    for case in cases:
        try:
            result = _crash_case(case, Path(root) / case)
        except Exception:
            result = {"case": case, "errors": [traceback.format_exc()]}
        print(json.dumps(result), flush=True)


@pytest.fixture(scope="module")
def crash_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    code = f"import tests.test_atomic_save as t; t.crash_driver({str(root)!r}, {list(CASES)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["case"]] = r
    assert proc.returncode == 0, proc.stderr[-4000:]
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_a_crash_after_any_step_leaves_old_or_new(case, crash_results):
    r = crash_results[case]
    assert not r["errors"], "\n".join(r["errors"][:20])
    _, _, _, directory, fallback = CASES[case]
    assert r["stops"] >= 8 and r["old"] > 0 and r["new"] > 0
    if directory:  # the whole directory changed in one step
        if fallback:
            assert "exchange" not in r["steps"] and r["steps"].count("rename") == 2 and r["recovered"] == 1
        else:
            assert r["steps"].count("exchange") == 1 and "rename" not in r["steps"] and r["recovered"] == 0
        assert "link" in r["steps"]  # the kept files were linked, not copied
    else:
        assert r["steps"].count("rename") == 1


# ----------------------------------------------------------------------------- two processes
HOLDER = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("atomic_alone", sys.argv[1])
atomic = importlib.util.module_from_spec(spec); spec.loader.exec_module(atomic)
target, ready, go = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])

def wait(p):
    p.write_bytes(b"partial")
    ready.write_text(str(p))
    deadline = time.time() + 60
    while not go.exists():
        if time.time() > deadline:
            sys.exit("never told to go on")
        time.sleep(0.01)
    p.write_text('{"from": "holder"}')

if sys.argv[5] == "dir":
    atomic.write_dir(target, {"config.json": wait})
else:
    with atomic.atomic_file(target) as tmp:
        wait(tmp)
"""


def _hold(tmp_path: Path, target: Path, kind: str):
    """A process (without torch) that holds a save to `target` until told to go on; yields the
    temporary file it is writing."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, atomic.__file__, str(target), str(ready), str(go), kind])
    deadline = time.time() + 60
    while not (ready.exists() and ready.read_text()):
        assert proc.poll() is None and time.time() < deadline, "the holder did not start its save"
        time.sleep(0.01)
    return proc, Path(ready.read_text()), go


@pytest.mark.parametrize("fmt", ["hf", "llama2c-bin-v1"])
def test_a_second_writer_gets_a_clear_error(fmt, tmp_path):
    directory = fmt == "hf"
    ws = tmp_path / "ws"
    target = ws / ("ckpt" if directory else "model.bin")
    first, second = tiny(fmt, False), tiny(fmt, True)
    ck.save(first, target, fmt)
    before = snapshot(target)
    proc, holder_tmp, go = _hold(tmp_path, target, "dir" if directory else "file")
    try:
        with pytest.raises(atomic.SaveInProgressError, match="another save to this path is in progress") as info:
            ck.save(second, target, fmt)
        assert str(target) in str(info.value)
        assert isinstance(info.value, RuntimeError)
        assert holder_tmp.exists(), "the live writer's temporary file was removed"
        assert snapshot(target) == before
        with pytest.raises(atomic.SaveInProgressError):
            atomic.recover(target)
    finally:
        go.touch()
        assert proc.wait(timeout=60) == 0
    assert (target / "config.json" if directory else target).read_text() == '{"from": "holder"}'
    assert sorted(os.listdir(ws)) == [target.name]
    ck.save(second, target, fmt)  # the lock is free again
    assert same_model(ck.load_model(target), second)
    assert sorted(os.listdir(ws)) == [target.name]


RACER = """
import sys, torch, llama
from llama import atomic
sys.path.insert(0, sys.argv[1])
from tests.test_atomic_save import tiny
model, path, rounds = tiny(sys.argv[3], True), sys.argv[2], int(sys.argv[4])
saved = refused = 0
print("ready", flush=True)
for _ in range(rounds):
    try:
        llama.checkpoint.save(model, path, sys.argv[3], max_shard_bytes=25_000); saved += 1
    except atomic.SaveInProgressError:
        refused += 1
print(saved, refused, flush=True)
"""


def test_two_processes_saving_at_once_never_mix(tmp_path):
    target = tmp_path / "ckpt"
    mine, theirs = tiny("hf", False), tiny("hf", True)
    snaps = {}
    for label, model in (("mine", mine), ("theirs", theirs)):
        ck.save(model, tmp_path / label, "hf", max_shard_bytes=25_000)
        snaps[label] = snapshot(tmp_path / label)
        shutil.rmtree(tmp_path / label)
    proc = subprocess.Popen([sys.executable, "-c", RACER, str(ROOT), str(target), "hf", "60"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    saved = refused = 0
    for _ in range(60):
        try:
            ck.save(mine, target, "hf", max_shard_bytes=25_000)
            saved += 1
        except atomic.SaveInProgressError:
            refused += 1
    their_saved, their_refused = map(int, proc.stdout.readline().split())
    assert proc.wait(timeout=60) == 0
    assert saved + their_saved > 0
    assert snapshot(target) in (snaps["mine"], snaps["theirs"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# ----------------------------------------------------------------------------- leftovers and details
def test_the_next_save_removes_leftovers_of_killed_saves_only(tmp_path):
    model = tiny("hf", False)
    target = ck.save(model, tmp_path / "ckpt", "hf")
    big = tmp_path / ".ckpt.k3x9_a0b.tmp"  # a killed save's directory, with a partial shard
    big.mkdir()
    (big / "model.safetensors").write_bytes(b"\0" * 100_000)
    (tmp_path / ".ckpt.lock").touch()  # a killed save's lock file (no longer locked)
    (target / ".model.safetensors.ab12cd34.tmp").write_bytes(b"partial")  # an older version's leftover
    unrelated = [".ckpt.v2.k3x9_a0b.tmp", ".ckpt.notes.tmp", ".other.k3x9_a0b.tmp", "ckpt.v2"]
    for name in unrelated:
        (tmp_path / name).write_bytes(b"not ours")
    file_target = tmp_path / "model.bin"
    ck.save(model, file_target, "llama2c-bin-v1")
    (tmp_path / ".model.bin.zz99yy88.tmp").write_bytes(b"partial")
    (tmp_path / ".model.bin.lock").touch()

    ck.save(model, target, "hf")
    ck.save(model, file_target, "llama2c-bin-v1")
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", "model.bin", *unrelated])
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    assert same_model(ck.load_model(target), model) and same_model(ck.load_model(file_target), model)


def test_a_directory_left_aside_by_the_fallback_is_put_back(tmp_path):
    model = tiny("native", False)
    target = ck.save(model, tmp_path / "ckpt", "native")
    os.rename(target, tmp_path / ".ckpt.bak.tmp")  # stopped between the fallback's two renames
    (tmp_path / ".ckpt.abcdefgh.tmp").mkdir()  # its new directory, maybe unfinished
    with pytest.raises(FileNotFoundError):
        ck.load_model(target)
    atomic.recover(target)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert same_model(ck.load_model(target), model)


def test_kept_files_are_copied_where_links_fail(tmp_path, monkeypatch):
    target = ck.save(tiny("native", False), tmp_path / "ckpt", "native")
    (target / "tokenizer.model").write_bytes(b"tok")

    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    new = tiny("native", True)
    ck.save(new, target, "native")
    assert (target / "tokenizer.model").read_bytes() == b"tok"
    assert same_model(ck.load_model(target), new)


def test_permissions_are_kept(tmp_path):
    target = ck.save(tiny("hf", False), tmp_path / "ckpt", "hf")
    assert (target.stat().st_mode & 0o777) == atomic.dir_mode()
    assert ((target / "config.json").stat().st_mode & 0o777) == atomic.file_mode()
    os.chmod(target, 0o750)
    (target / "notes").write_bytes(b"x")
    os.chmod(target / "notes", 0o600)
    ck.save(tiny("hf", True), target, "hf")
    assert (target.stat().st_mode & 0o777) == 0o750
    assert ((target / "notes").stat().st_mode & 0o777) == 0o600
    assert ((target / "config.json").stat().st_mode & 0o777) == atomic.file_mode()


def test_a_symlink_to_a_checkpoint_stays_a_symlink(tmp_path):
    real = ck.save(tiny("native", False), tmp_path / "real", "native")
    link = tmp_path / "link"
    link.symlink_to("real")
    new = tiny("native", True)
    ck.save(new, link, "native")
    assert link.is_symlink() and same_model(ck.load_model(real), new)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_without_fcntl_saves_still_work(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "fcntl", None)
    model = tiny("hf", False)
    ck.save(model, tmp_path / "ckpt", "hf")
    ck.save(model, tmp_path / "ckpt", "hf")
    atomic.write_bytes(tmp_path / "f", b"x")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "f"]
    assert same_model(ck.load_model(tmp_path / "ckpt"), model)


def test_write_dir_refuses_names_that_are_not_plain(tmp_path):
    for name in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="plain file name"):
            atomic.write_dir(tmp_path / "d", {name: lambda p: p.write_bytes(b"")})
    assert os.listdir(tmp_path) == []


def test_a_filesystem_that_refuses_the_exchange_gets_the_fallback(tmp_path, monkeypatch):
    import ctypes

    def refusing(old, new, flags):
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(atomic, "_renameat2", refusing)
    steps: list[str] = []
    target = ck.save(tiny("hf", False), tmp_path / "ckpt", "hf")
    monkeypatch.setattr(atomic, "_after_step", steps.append)
    new = tiny("hf", True)
    ck.save(new, target, "hf")
    assert [s.split()[0] for s in steps].count("rename") == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert same_model(ck.load_model(target), new)


def test_a_filesystem_without_locks_still_saves(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    model = tiny("native", False)
    ck.save(model, tmp_path / "ckpt", "native")
    ck.save(model, tmp_path / "ckpt", "native")
    atomic.write_bytes(tmp_path / "f", b"x")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "f"]
    assert same_model(ck.load_model(tmp_path / "ckpt"), model)
