"""Loading hostile or malformed checkpoints: every one is refused with a ValueError (or
FileNotFoundError) that names the file and the field, at a small multiple of the file's size in
time and memory, and valid small checkpoints still load.

The corpus is generated here. The cases load in a child process that runs under an
address-space limit (RLIMIT_AS) and a CPU-time limit, plus a wall-clock timeout, so a loader
that allocates or loops for what a header declares fails these tests instead of hanging or
exhausting the machine. The child reports each case as one JSON line; a case that kills it is
reported as such and a new child goes on with the rest. The tests here check the reports.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama import checkpoint as ck
from llama.config import ModelConfig
from llama.model import ROPE_INITIAL_POSITIONS, build

ADDRESS_SPACE = 3 * 2**30  # importing torch and loading a tiny model needs under 1 GiB of it
CPU_SECONDS = 30           # for the whole corpus in one child; it needs a few seconds
CHILD_SECONDS = 60         # wall-clock time for one child (a FIFO read, say, blocks without using CPU)
WALL_SECONDS = 240         # for all children together
CASE_SECONDS = 10          # any one case

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
LLAMA2C_MAGIC = 0x616B3432


# ----------------------------------------------------------------------------- building the corpus
def _model():
    model = build(CFG)
    return model.eval()


def _edit_json(path: Path, edit: Callable[[dict], Any]) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _bin_header(version: int, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97,
                max_seq_len=64, shared=1, group_size=32) -> bytes:
    if version == 0:
        return struct.pack("<7i", dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len)
    head = struct.pack("<Ii7iB", LLAMA2C_MAGIC, version, dim, hidden_dim, n_layers, n_heads, n_kv_heads,
                       vocab_size, max_seq_len, shared)
    if version == 2:
        head += struct.pack("<i", group_size)
    return head + b"\0" * (256 - len(head))


class Corpus:
    """The files, made once per module: valid checkpoints of every format, then hostile copies."""

    def __init__(self, root: Path):
        self.root = root
        model = _model()
        self.native = ck.save(model, root / "native")
        self.hf = ck.save(model, root / "hf", "hf")
        self.pt = ck.save(model, root / "model.pt", "llama2c-pt")
        self.bins = {v: ck.save(model, root / f"model-v{v}.bin", f"llama2c-bin-v{v}") for v in (0, 1, 2)}
        self.count = 0

    def fresh(self, name: str) -> Path:
        self.count += 1
        return self.root / f"case{self.count:03d}-{name}"

    def copy_dir(self, src: Path, name: str) -> Path:
        dst = self.fresh(name)
        dst.mkdir()
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        return dst

    def hf_config(self, edit: Callable[[dict], Any], name: str = "hf") -> Path:
        d = self.copy_dir(self.hf, name)
        _edit_json(d / "config.json", edit)
        return d

    def native_config(self, edit: Callable[[dict], Any], name: str = "native") -> Path:
        d = self.copy_dir(self.native, name)
        _edit_json(d / "config.json", edit)
        return d

    def file(self, data: bytes, name: str) -> Path:
        path = self.fresh(name)
        path.write_bytes(data)
        return path

    def patched_bin(self, version: int, offset: int, value: int) -> Path:
        data = bytearray(self.bins[version].read_bytes())
        struct.pack_into("<i", data, offset, value)
        return self.file(bytes(data), f"v{version}.bin")

    def pt_args(self, **changes: Any) -> Path:
        ckpt = torch.load(self.pt, weights_only=True)
        ckpt["model_args"].update(changes)
        path = self.fresh("model.pt")
        torch.save(ckpt, path)
        return path


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda raw: raw.__setitem__(key, value)


def _set_model(key: str, value: Any) -> Callable[[dict], None]:
    return lambda raw: raw["model"].__setitem__(key, value)


def _float64_native(c: Corpus) -> Path:
    d = c.copy_dir(c.native, "native-f64")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["layers.0.attention.wq.weight"] = tensors["layers.0.attention.wq.weight"].double()
    save_file(tensors, str(d / "model.safetensors"))
    return d


def _deep_json(c: Corpus) -> Path:
    d = c.copy_dir(c.hf, "hf-deep")
    (d / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return d


def _huge_int_json(c: Corpus) -> Path:
    d = c.copy_dir(c.hf, "hf-bigint")
    raw = (d / "config.json").read_text()
    (d / "config.json").write_text(raw.replace('"num_hidden_layers": 2', '"num_hidden_layers": ' + "9" * 20_000))
    return d


def _fifo(c: Corpus) -> Path:
    path = c.fresh("fifo.bin")
    os.mkfifo(path)
    return path


def _fifo_config(c: Corpus) -> Path:
    d = c.fresh("dir-fifo-config")
    d.mkdir()
    os.mkfifo(d / "config.json")
    return d


def _fifo_weights(c: Corpus) -> Path:
    d = c.copy_dir(c.hf, "hf-fifo-weights")
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")
    return d


# Each case: name -> (build(corpus) -> (path, where), load_model kwargs, expected outcome, fields).
# where: which path the message must name (the file, or the directory, or its config.json).
# outcome: "ok" (it loads), "ValueError" or "FileNotFoundError"; fields: words the message must hold.
Case = tuple[Callable[[Corpus], tuple[Path, Path]], dict, str, tuple[str, ...]]


def _same(build_path: Callable[[Corpus], Path]) -> Callable[[Corpus], tuple[Path, Path]]:
    def make(c: Corpus) -> tuple[Path, Path]:
        p = build_path(c)
        return p, p
    return make


def _config(build_dir: Callable[[Corpus], Path]) -> Callable[[Corpus], tuple[Path, Path]]:
    def make(c: Corpus) -> tuple[Path, Path]:
        d = build_dir(c)
        return d, d / "config.json"
    return make


CASES: dict[str, Case] = {
    # positive controls: the harness must let valid files load
    "ok-native": (lambda c: (c.native, c.native), {}, "ok", ()),
    "ok-hf": (lambda c: (c.hf, c.hf), {}, "ok", ()),
    "ok-pt": (lambda c: (c.pt, c.pt), {}, "ok", ()),
    "ok-bin-v0": (lambda c: (c.bins[0], c.bins[0]), {}, "ok", ()),
    "ok-bin-v1": (lambda c: (c.bins[1], c.bins[1]), {}, "ok", ()),
    "ok-bin-v2": (lambda c: (c.bins[2], c.bins[2]), {}, "ok", ()),
    # a valid file may declare a huge max_seq_len: the RoPE tables are not built that long
    "ok-bin-v1-max-seq-len": (_same(lambda c: c.patched_bin(1, 32, 2**31 - 1)), {}, "ok", ()),
    "ok-hf-max-position": (_same(lambda c: c.hf_config(_set("max_position_embeddings", 2**31 - 1))), {}, "ok", ()),
    "ok-native-float64-cast": (_same(_float64_native), {"dtype": "float32"}, "ok", ()),

    # llama2.c .bin headers
    "bin-v1-layers-2**31": (_same(lambda c: c.file(_bin_header(1, n_layers=2**31 - 1), "v1.bin")), {},
                            "ValueError", ("n_layers", "truncated")),
    "bin-v1-layers-50000": (_same(lambda c: c.file(_bin_header(1, n_layers=50_000), "v1.bin")), {},
                            "ValueError", ("n_layers", "truncated")),
    "bin-v2-layers-2**31": (_same(lambda c: c.file(_bin_header(2, n_layers=2**31 - 1), "v2.bin")), {},
                            "ValueError", ("n_layers", "truncated")),
    "bin-v1-dim-2**30": (_same(lambda c: c.file(_bin_header(1, dim=2**30, hidden_dim=2**31 - 1), "v1.bin")), {},
                         "ValueError", ("dim",)),
    "bin-v1-vocab-2**31": (_same(lambda c: c.file(_bin_header(1, vocab_size=2**31 - 1), "v1.bin")), {},
                           "ValueError", ("vocab_size",)),
    "bin-v0-max-seq-len": (_same(lambda c: c.patched_bin(0, 24, 2**24 - 1)), {}, "ValueError", ("max_seq_len",)),
    "bin-v0-layers": (_same(lambda c: c.patched_bin(0, 8, 2**24 - 1)), {}, "ValueError", ("n_layers",)),
    "bin-v1-negative-layers": (_same(lambda c: c.patched_bin(1, 16, -5)), {}, "ValueError", ("n_layers",)),
    "bin-v1-negative-dim": (_same(lambda c: c.patched_bin(1, 8, -64)), {}, "ValueError", ("dim",)),
    "bin-v1-negative-vocab": (_same(lambda c: c.patched_bin(1, 28, -97)), {}, "ValueError", ("vocab_size",)),
    "bin-v2-group-size": (_same(lambda c: c.patched_bin(2, 37, 2**31 - 1)), {}, "ValueError", ("group_size",)),
    "bin-v1-trailing": (_same(lambda c: c.file(c.bins[1].read_bytes() + b"\0" * 4, "v1.bin")), {}, "ValueError",
                        ("trailing",)),

    # Hugging Face config.json
    "hf-layers-2**31": (_same(lambda c: c.hf_config(_set("num_hidden_layers", 2**31 - 1))), {}, "ValueError",
                        ("n_layers",)),
    "hf-layers-50000": (_same(lambda c: c.hf_config(_set("num_hidden_layers", 50_000))), {}, "ValueError",
                        ("n_layers",)),
    "hf-hidden-size": (_same(lambda c: c.hf_config(lambda r: r.update(hidden_size=2**24, head_dim=2**22))), {},
                       "ValueError", ("dim",)),
    "hf-vocab": (_same(lambda c: c.hf_config(_set("vocab_size", 2**40))), {}, "ValueError", ("vocab_size",)),
    "hf-intermediate": (_same(lambda c: c.hf_config(_set("intermediate_size", 2**62))), {}, "ValueError",
                        ("hidden_dim",)),
    "hf-eps-null": (_config(lambda c: c.hf_config(_set("rms_norm_eps", None))), {}, "ValueError",
                    ("rms_norm_eps",)),
    "hf-rope-scaling-string": (_config(lambda c: c.hf_config(_set("rope_scaling", "linear"))), {}, "ValueError",
                               ("rope_scaling",)),
    "hf-rope-parameters-list": (_config(lambda c: c.hf_config(_set("rope_parameters", [1, 2]))), {}, "ValueError",
                                ("rope_parameters",)),
    "hf-rope-factor-string": (_config(lambda c: c.hf_config(_set("rope_scaling", {"type": "linear", "factor": "2"}))),
                              {}, "ValueError", ("factor",)),
    "hf-rope-theta-null": (_config(lambda c: c.hf_config(lambda r: r.update(rope_theta=None, rope_parameters=None))),
                           {}, "ValueError", ("rope_theta",)),
    "hf-tie-string": (_config(lambda c: c.hf_config(_set("tie_word_embeddings", "false"))), {}, "ValueError",
                      ("tie_word_embeddings",)),
    "hf-heads-string": (_config(lambda c: c.hf_config(_set("num_attention_heads", "4"))), {}, "ValueError",
                        ("num_attention_heads",)),
    "hf-layers-bool": (_config(lambda c: c.hf_config(_set("num_hidden_layers", True))), {}, "ValueError",
                       ("num_hidden_layers",)),
    "hf-layers-float": (_config(lambda c: c.hf_config(_set("num_hidden_layers", 2.0))), {}, "ValueError",
                        ("num_hidden_layers",)),
    "hf-dropout-string": (_config(lambda c: c.hf_config(_set("attention_dropout", "0"))), {}, "ValueError",
                          ("attention_dropout",)),
    "hf-theta-infinite": (_config(lambda c: c.hf_config(lambda r: r.update(rope_theta=1e400, rope_parameters=None))),
                          {}, "ValueError", ("rope_theta",)),
    "hf-architectures-number": (_config(lambda c: c.hf_config(lambda r: (r.pop("model_type"),
                                                                          r.update(architectures=5)))),
                                {}, "ValueError", ("model_type", "architectures")),
    "hf-nested-json": (_config(_deep_json), {}, "ValueError", ("JSON",)),
    "hf-huge-integer": (_config(_huge_int_json), {}, "ValueError", ("JSON",)),

    # native config.json and tensors
    "native-dim-string": (_config(lambda c: c.native_config(_set_model("dim", "64"))), {}, "ValueError", ("dim",)),
    "native-tie-string": (_config(lambda c: c.native_config(_set_model("tie_embeddings", "false"))), {},
                          "ValueError", ("tie_embeddings",)),
    "native-eps-null": (_config(lambda c: c.native_config(_set_model("norm_eps", None))), {}, "ValueError",
                        ("norm_eps",)),
    "native-scaling-bool": (_config(lambda c: c.native_config(_set_model("rope_scaling", True))), {}, "ValueError",
                            ("rope_scaling",)),
    "native-layers-1e30": (_config(lambda c: c.native_config(_set_model("n_layers", 10**30))), {}, "ValueError",
                           ("n_layers",)),
    "native-layers-2**31": (_same(lambda c: c.native_config(_set_model("n_layers", 2**31 - 1))), {}, "ValueError",
                            ("n_layers",)),
    "native-version-bool": (_config(lambda c: c.native_config(_set("version", True))), {}, "ValueError",
                            ("version",)),
    "native-float64": (_same(_float64_native), {}, "ValueError", ("layers.0.attention.wq.weight", "float64")),

    # llama2.c .pt model_args
    "pt-layers-2**31": (_same(lambda c: c.pt_args(n_layers=2**31 - 1)), {}, "ValueError", ("n_layers",)),
    "pt-dim-2**20": (_same(lambda c: c.pt_args(dim=2**20, hidden_dim=2**20)), {}, "ValueError", ("dim",)),
    "pt-vocab-string": (_same(lambda c: c.pt_args(vocab_size="97")), {}, "ValueError", ("vocab_size",)),
    "pt-eps-none-string": (_same(lambda c: c.pt_args(norm_eps="1e-5")), {}, "ValueError", ("norm_eps",)),

    # paths that are not regular files or directories, or nothing at all
    "fifo": (_same(_fifo), {}, "ValueError", ("FIFO",)),
    "fifo-config-json": (_config(_fifo_config), {}, "ValueError", ("FIFO",)),
    "fifo-weights": (lambda c: (lambda d: (d, d / "model.safetensors"))(_fifo_weights(c)), {}, "ValueError",
                     ("FIFO",)),
    "device": (lambda c: (Path(os.devnull), Path(os.devnull)), {}, "ValueError", ("character device",)),
    "missing": (lambda c: (c.root / "nothing-here", c.root / "nothing-here"), {}, "FileNotFoundError", ()),
}


# ----------------------------------------------------------------------------- the child process
CHILD = textwrap.dedent("""
    import json, resource, sys, time
    limits = json.loads(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limits["as"], limits["as"]))
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu"], limits["cpu"] + 5))
    import torch
    from llama import checkpoint as ck
    for line in sys.stdin:
        case = json.loads(line)
        kwargs = {k: getattr(torch, v) if k == "dtype" else v for k, v in case["kwargs"].items()}
        start = time.monotonic()
        out = {"name": case["name"]}
        try:
            model = ck.load_model(case["path"], **kwargs)
            out.update(kind="ok", rope=model.rope_cos.shape[0],
                       finite=bool(torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()))
        except BaseException as e:  # everything, MemoryError and RecursionError included
            out.update(kind=type(e).__name__, message=str(e)[:2000])
        out["seconds"] = time.monotonic() - start
        print(json.dumps(out), flush=True)
""")


def _run_child(cases: list[dict], timeout: float) -> tuple[list[dict], dict]:
    """Load `cases` in one limited child process: the rows it reported, and how it ended."""
    limits = json.dumps({"as": ADDRESS_SPACE, "cpu": CPU_SECONDS})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    lines = "".join(json.dumps(case) + "\n" for case in cases)
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, limits], input=lines, capture_output=True, text=True,
                              timeout=timeout, env=env)
        stdout, ended = proc.stdout, {"rc": proc.returncode, "stderr": proc.stderr[-3000:]}
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        ended = {"rc": None, "stderr": f"killed after {timeout:.0f} s of wall-clock time"}
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")], ended


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    """{case name: what the child reported}, "_process": how the last child ended. A case that
    kills its child (CPU limit, a crash, a hang) is reported as such, and a new child takes the
    cases after it, until WALL_SECONDS are spent."""
    corpus = Corpus(tmp_path_factory.mktemp("hostile"))
    made = {name: case[0](corpus) for name, case in CASES.items()}
    pending = [{"name": name, "path": str(made[name][0]), "kwargs": CASES[name][1]} for name in CASES]
    out: dict[str, dict] = {}
    deadline = time.monotonic() + WALL_SECONDS
    ended: dict = {}
    while pending and time.monotonic() < deadline:
        rows, ended = _run_child(pending, min(CHILD_SECONDS, deadline - time.monotonic()))
        for row in rows:
            out[row["name"]] = {**row, "where": str(made[row["name"]][1])}
        pending = [case for case in pending if case["name"] not in out]
        if pending:  # the child died on the first case it did not report
            dead = pending.pop(0)["name"]
            out[dead] = {"name": dead, "kind": "child process died", "message": str(ended), "seconds": 0.0,
                         "where": str(made[dead][1])}
    out["_process"] = ended
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_clearly_and_cheaply(name, results):
    _, _, outcome, fields = CASES[name]
    row: Optional[dict] = results.get(name)
    assert row is not None, f"case {name} did not run within {WALL_SECONDS} s: {results['_process']}"
    assert row["seconds"] < CASE_SECONDS, f"{name}: took {row['seconds']:.1f} s"
    if outcome == "ok":
        assert row["kind"] == "ok", f"{name}: a valid checkpoint failed to load: {row}"
        assert row["finite"]
        assert row["rope"] <= ROPE_INITIAL_POSITIONS, f"{name}: RoPE tables built for {row['rope']} positions"
        return
    assert row["kind"] == outcome, f"{name}: expected {outcome}, got {row['kind']}: {row.get('message')}"
    message = row["message"]
    assert row["where"] in message, f"{name}: message does not name {row['where']}: {message}"
    for field in fields:
        assert field in message, f"{name}: message does not name {field!r}: {message}"


def test_child_process_ran_every_case(results):
    assert set(CASES) <= set(results), results["_process"]
    died = [name for name in CASES if results[name]["kind"] == "child process died"]
    assert not died and results["_process"]["rc"] == 0, (died, results["_process"])


def test_limits_catch_unbounded_allocation(tmp_path):
    """The harness itself: under the same limits, allocating for what a header declares fails."""
    script = CHILD.split("import torch")[0] + "import torch\ntorch.empty(2**31 - 1, 8)\n"
    limits = json.dumps({"as": ADDRESS_SPACE, "cpu": CPU_SECONDS})
    proc = subprocess.run([sys.executable, "-c", script, limits], input="", capture_output=True, text=True,
                          timeout=WALL_SECONDS)
    assert proc.returncode != 0 and ("MemoryError" in proc.stderr or "RuntimeError" in proc.stderr
                                     or "alloc" in proc.stderr.lower()), proc.stderr[-2000:]


def test_tensor_count_bounds_n_layers_before_the_model_is_built():
    """A config that passes the byte check (none here, as for a .bin checked exactly) but
    declares far more layers than the checkpoint has tensors is refused before building."""
    from llama.formats.common import Source, check_config_fits

    source = Source(CFG.replace(n_layers=10**9), [f"t{i}" for i in range(30)], fetch=None)
    with pytest.raises(ValueError, match="somewhere: the config declares n_layers 1000000000"):
        check_config_fits(source, source.config, "somewhere")
    check_config_fits(Source(CFG, [f"t{i}" for i in range(21)], fetch=None), CFG, "somewhere")  # fits


# ----------------------------------------------------------------------------- RoPE tables on demand
def test_rope_tables_grow_on_demand_up_to_max_seq_len(monkeypatch):
    """A declared max_seq_len costs nothing until used: the tables start short, grow to what a
    forward or generate() needs (same values as tables built in full), and positions past
    max_seq_len stay an error without RoPE scaling."""
    import llama.model as model_module
    from llama.generate import Sampling, generate
    from llama.model import rope_tables

    cfg = CFG.replace(max_seq_len=64)
    full = _model()  # tables for all 64 positions (ROPE_INITIAL_POSITIONS is larger)
    monkeypatch.setattr(model_module, "ROPE_INITIAL_POSITIONS", 8)
    lazy = build(cfg).eval()
    lazy.load_state_dict(full.state_dict())
    assert lazy.rope_cos.shape[0] == 8
    tokens = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lazy(tokens), full(tokens))
    assert 20 <= lazy.rope_cos.shape[0] <= 64
    torch.testing.assert_close(lazy.rope_cos[:20], rope_tables(cfg, 64)[0][:20])
    with pytest.raises(ValueError, match="exceed max_seq_len 64"):
        lazy(torch.zeros(1, 65, dtype=torch.long))
    prompt = [1, 2, 3]
    assert generate(lazy, [prompt], 50, Sampling(temperature=0)) == generate(full, [prompt], 50,
                                                                             Sampling(temperature=0))
    assert lazy.rope_cos.shape[0] <= 64

    dynamic = build(cfg.replace(rope_scaling="dynamic", rope_scaling_factor=2.0)).eval()
    assert dynamic.rope_cos.shape[0] == 8
    with torch.no_grad():
        dynamic(torch.zeros(1, 100, dtype=torch.long))
    torch.testing.assert_close(dynamic.rope_cos, rope_tables(dynamic.config, 100)[0])  # base raised for 100
    dynamic.setup_rope(10)  # back within max_seq_len: the trained frequencies again
    assert dynamic.rope_cos.shape[0] <= 64
    torch.testing.assert_close(dynamic.rope_cos[:10], rope_tables(dynamic.config, 64)[0][:10])
