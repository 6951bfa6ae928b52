"""The compiled module: how it was built, its entry points' own checks, and the no-CUDA build."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import llama_kernels

ROOT = Path(__file__).resolve().parents[1]

# The names llama_kernels._C bound before each op moved its bindings to its own files; none may go.
NAMES_BOUND_BEFORE_PER_OP_BINDINGS = {
    "TensorArg", "build_info", "cpu_isa", "cpu_isas", "dtype_codes", "set_cpu_isa",
    "rms_norm_fwd_cpu", "rms_norm_bwd_cpu", "linear_cpu", "int4_matmul_cpu", "int4_dequantize_cpu",
    "rope_decode_attention_cpu", "rms_norm_fwd_cuda", "rms_norm_bwd_cuda", "rms_norm_max_cols_cuda",
    "int4_matmul_cuda", "int4_matmul_max_rows_cuda", "int4_dequantize_cuda", "rope_decode_attention_cuda",
    "rope_decode_workspace_elems_cuda",
}


def bound_in_sources() -> tuple[set[str], set[str]]:
    """(every name the C++ sources bind, the CUDA entry names), read from csrc/: each op binds its
    own names (csrc/registry.h), so a binding file the build leaves out shows up as a missing name.
    Each CUDA entry file must bind the same names with and without CUDA (stubs)."""
    names, cuda = set(), set()
    for path in sorted((ROOT / "csrc").rglob("*.cpp")):
        text = path.read_text()
        defined = set(re.findall(r'\bm\.def\(\s*"(\w+)"', text))
        stubs = set(re.findall(r'LLAMA_KERNELS_BIND_NO_CUDA\(\s*"(\w+)"', text))
        names |= defined | stubs | set(re.findall(r'py::class_<[^>]*>\(\s*m,\s*"(\w+)"', text))
        if path.name.endswith("_entry.cpp"):
            assert defined == stubs, (path.name, sorted(defined ^ stubs))
            cuda |= stubs
    return names, cuda


def test_extension_is_built():
    caps = llama_kernels.capabilities()
    assert caps.ext is not None, caps.ext_error


def test_build_info_reports_everything():
    info = llama_kernels.build_info()
    for key in ("version", "cxx_compiler", "openmp", "cpu_isas", "cpu_isa", "cuda", "cuda_archs",
                "torch", "triton", "triton_interpreter", "backends"):
        assert key in info, key
    assert info["extension_version"] == info["version"] == llama_kernels.__version__
    assert "baseline" in info["cpu_isas"] and info["cpu_isa"] in info["cpu_isas"]
    assert "torch" in info["backends"]["cpu"]
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_compiler"].startswith("NVCC")


def test_module_binds_exactly_the_names_in_its_sources():
    ext = llama_kernels.capabilities().ext
    names, cuda = bound_in_sources()
    assert NAMES_BOUND_BEFORE_PER_OP_BINDINGS <= names, sorted(NAMES_BOUND_BEFORE_PER_OP_BINDINGS - names)
    assert {n for n in NAMES_BOUND_BEFORE_PER_OP_BINDINGS if n.endswith("_cuda")} <= cuda
    assert {name for name in dir(ext) if not name.startswith("__")} == names


def test_cpu_entry_points_check_their_arguments():
    ext = llama_kernels.capabilities().ext
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="x: unknown dtype code 7"):
        ext.rms_norm_fwd_cpu(x.data_ptr(), 0, x.data_ptr(), x.data_ptr(), 0, x.data_ptr(), 2, 4, 4, 0, 4, 0, 7, 0, 1e-6, 1)
    with pytest.raises(ValueError, match="s: the sum x . h needs an output"):
        ext.rms_norm_fwd_cpu(x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(), 0, 0, 2, 4, 4, 4, 4, 0, 0, 0, 1e-6, 1)
    with pytest.raises(ValueError, match="isa: unknown instruction set 'sse9'"):
        ext.set_cpu_isa("sse9")


def test_dtype_codes_come_from_the_extension():
    """The entry points' dtype codes are the C++ enum's (csrc/common.h), read from the module."""
    ext = llama_kernels.capabilities().ext
    assert ext.dtype_codes() == {"float32": 0, "float16": 1, "bfloat16": 2, "uint8": 3, "int32": 4, "int64": 5}
    codes = llama_kernels.dispatch.DTYPE_CODES
    assert {d: codes[d] for d in (torch.float32, torch.float16, torch.bfloat16)} == \
        {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    assert {d: codes[d] for d in (torch.uint8, torch.int32, torch.int64)} == {torch.uint8: 3, torch.int32: 4, torch.int64: 5}


def test_import_and_reference_ops_work_without_the_extension():
    """Without llama_kernels._C the package imports and the ops fall back to the reference; the
    dtype codes, which only compiled backends need, say why they are missing."""
    probe = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'llama_kernels._C':\n"
        "            raise ImportError('blocked by the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, llama_kernels\n"
        "assert llama_kernels.capabilities().ext is None\n"
        "x, w = torch.randn(3, 8), torch.randn(8)\n"
        "assert torch.equal(llama_kernels.rms_norm(x, w), llama_kernels.rms_norm_reference(x, w))\n"
        "try:\n    llama_kernels.dispatch.DTYPE_CODES\n"
        "except RuntimeError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_KERNELS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "llama_kernels._C is not importable (blocked by the test)" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_entry_point_without_a_device_raises():
    ext = llama_kernels.capabilities().ext
    match = "CUDA error" if ext.build_info()["cuda"] else "built without CUDA"
    with pytest.raises(RuntimeError, match=match):
        x = ext.TensorArg(4096, 0, 0, [2, 4], [4, 1])  # a float32 (2, 4) tensor on cuda:0, never read
        w, y, none = ext.TensorArg(8192, 0, 0, [4], [1]), ext.TensorArg(12288, 0, 0, [2, 4], [4, 1]), ext.TensorArg()
        llama_kernels.dispatch.cuda_call(ext.rms_norm_fwd_cuda, x, none, w, y, none, none, 1e-6, 0)


@pytest.mark.slow
def test_wheel_without_cuda_installs_only_our_names(tmp_path):
    """A wheel built with LLAMA_KERNELS_NO_CUDA=1 holds llama_kernels/, llama/ and its dist-info and
    nothing else (no top-level kernels/ to overwrite Hugging Face's); its _C has the CPU kernels
    only, and the CUDA entry points say so. An old build variable name is pointed out."""
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None and importlib.util.find_spec(tool) is None:
            pytest.skip(f"{tool} is not installed")
    pytest.importorskip("pybind11")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "out", ".pytest_cache", "results"))
    env = {**os.environ, "LLAMA_KERNELS_NO_CUDA": "1", "KERNELS_NO_CUDA": "1", "MAX_JOBS": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist"),
         str(src)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "warning: KERNELS_NO_CUDA is set but no longer read; set LLAMA_KERNELS_NO_CUDA instead" in result.stderr
    (wheel,) = (tmp_path / "dist").glob("llama_kernels-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {name.split("/")[0] for name in names}
        assert tops == {"llama", "llama_kernels", f"llama_kernels-{llama_kernels.__version__}.dist-info"}, tops
        sources = {p.relative_to(ROOT).as_posix() for package in ("llama", "llama_kernels")
                   for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts}
        assert sources and not sources - set(names), sorted(sources - set(names))  # every module, subpackages too
        (so,) = [name for name in names if re.fullmatch(r"llama_kernels/_C\.[^/]+\.so", name)]
        z.extract(so, tmp_path / "unpacked")
    bound, cuda = bound_in_sources()
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('llama_kernels._C', {str(tmp_path / 'unpacked' / so)!r})\n"
        "C = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(C)\n"
        "assert C.build_info()['cuda'] is False\n"
        "assert C.dtype_codes() == {'float32': 0, 'float16': 1, 'bfloat16': 2, 'uint8': 3, 'int32': 4, 'int64': 5}\n"
        "t = C.TensorArg(4096, 0, 0, [2, 4], [4, 1])\n"
        "try:\n    C.rms_norm_fwd_cuda(t, C.TensorArg(), C.TensorArg(4096, 0, 0, [4], [1]), t, C.TensorArg(), "
        "C.TensorArg(), 1e-6, 0)\n"
        "except RuntimeError as e:\n    print(e)\n"
        f"assert {{n for n in dir(C) if not n.startswith('__')}} == set({sorted(bound)!r}), sorted(dir(C))\n"
        f"for name in {sorted(cuda)!r}:\n"
        "    try:\n        getattr(C, name)(1, x=2)\n    except RuntimeError as e:\n"
        "        assert 'built without CUDA' in str(e), (name, e)\n"
        "    else:\n        raise AssertionError(name + ' did not raise')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "built without CUDA" in result.stdout
    assert "LLAMA_KERNELS_NO_CUDA=1" in result.stdout
