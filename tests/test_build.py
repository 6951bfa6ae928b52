"""The compiled module: how it was built, its entry points' own checks, and the no-CUDA build."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels

ROOT = Path(__file__).resolve().parents[1]


def test_extension_is_built():
    caps = kernels.capabilities()
    assert caps.ext is not None, caps.ext_error


def test_build_info_reports_everything():
    info = kernels.build_info()
    for key in ("version", "cxx_compiler", "openmp", "cpu_isas", "cpu_isa", "cuda", "cuda_archs",
                "torch", "triton", "triton_interpreter", "backends"):
        assert key in info, key
    assert info["extension_version"] == info["version"] == kernels.__version__
    assert "baseline" in info["cpu_isas"] and info["cpu_isa"] in info["cpu_isas"]
    assert "torch" in info["backends"]["cpu"]
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_compiler"].startswith("NVCC")


def test_cpu_entry_points_check_their_arguments():
    ext = kernels.capabilities().ext
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="x: unknown dtype code 7"):
        ext.rms_norm_fwd_cpu(x.data_ptr(), 0, x.data_ptr(), x.data_ptr(), 0, x.data_ptr(), 2, 4, 4, 0, 4, 0, 7, 0, 1e-6, 1)
    with pytest.raises(ValueError, match="s: the sum x . h needs an output"):
        ext.rms_norm_fwd_cpu(x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(), 0, 0, 2, 4, 4, 4, 4, 0, 0, 0, 1e-6, 1)
    with pytest.raises(ValueError, match="isa: unknown instruction set 'sse9'"):
        ext.set_cpu_isa("sse9")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_entry_point_without_a_device_raises():
    ext = kernels.capabilities().ext
    match = "CUDA error" if ext.build_info()["cuda"] else "built without CUDA"
    with pytest.raises(RuntimeError, match=match):
        kernels._dispatch.cuda_call(ext.rms_norm_fwd_cuda, 0, 0, 0, 0, 0, 0, 2, 4, 4, 0, 4, 0, 0, 0, 1e-6, 0, 0)


@pytest.mark.slow
def test_build_without_cuda(tmp_path):
    """KERNELS_NO_CUDA=1 builds only the CPU kernels, and the CUDA entry points say so."""
    pybind11 = pytest.importorskip("pybind11")
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    build, out = tmp_path / "build", tmp_path / "out" / "kernels"
    out.mkdir(parents=True)
    generator = ["-GNinja"] if shutil.which("ninja") else []
    subprocess.run(
        [cmake, f"-S{ROOT}", f"-B{build}", *generator, "-DKERNELS_NO_CUDA=ON",
         f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}", f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
        check=True, capture_output=True,
    )
    subprocess.run([cmake, "--build", str(build), "-j", "2"], check=True, capture_output=True)
    (so,) = out.glob("_C*")
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_C', {str(so)!r})\n"
        "C = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(C)\n"
        "assert C.build_info()['cuda'] is False\n"
        "try:\n    C.rms_norm_fwd_cuda(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0.0, 0, 0)\n"
        "except RuntimeError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "built without CUDA" in result.stdout
