"""Builds llama_kernels._C with CMake and ninja; everything else is in pyproject.toml.

Environment:
  LLAMA_KERNELS_NO_CUDA=1          build only the C++ CPU kernels, even where nvcc exists
  LLAMA_KERNELS_CUDA_ARCHS=80;90a  CUDA targets (default 80;90a)
  LLAMA_KERNELS_NATIVE=1           tune the baseline CPU code for this machine (not portable)
  LLAMA_KERNELS_DEBUG=1            debug build
  MAX_JOBS=N                       parallel compile jobs (default: cores, capped by memory at 4 GiB a job)

The same names without the LLAMA_ prefix were read before the package was renamed; they are
ignored now, with a warning, since Hugging Face's `kernels` package reads KERNELS_* variables.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    text = (ROOT / "llama_kernels" / "__init__.py").read_text()
    return re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M).group(1)


def _tool(module: str, attr: str, name: str) -> str:
    """A build tool from its PyPI package (the isolated build env) or else from PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"building llama_kernels._C needs {name}; `pip install {module}`")
    return found


def _jobs() -> int:
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    return max(1, min(cores or 1, int(mem_gib // 4)))


def _flag(name: str) -> str:
    return "ON" if os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes") else "OFF"


def _warn_old_env_names() -> None:
    for name in ("KERNELS_NO_CUDA", "KERNELS_CUDA_ARCHS", "KERNELS_NATIVE", "KERNELS_DEBUG"):
        if name in os.environ:
            print(f"warning: {name} is set but no longer read; set LLAMA_{name} instead", file=sys.stderr)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        _warn_old_env_names()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        build_type = "Debug" if _flag("LLAMA_KERNELS_DEBUG") == "ON" else "Release"
        args = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLLAMA_KERNELS_VERSION={_version()}",
            f"-DLLAMA_KERNELS_NO_CUDA={_flag('LLAMA_KERNELS_NO_CUDA')}",
            f"-DLLAMA_KERNELS_NATIVE={_flag('LLAMA_KERNELS_NATIVE')}",
        ]
        if os.environ.get("LLAMA_KERNELS_CUDA_ARCHS"):
            args.append(f"-DLLAMA_KERNELS_CUDA_ARCHS={os.environ['LLAMA_KERNELS_CUDA_ARCHS']}")
        subprocess.run([cmake, *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", str(_jobs())], check=True)


setup(ext_modules=[CMakeExtension("llama_kernels._C")], cmdclass={"build_ext": CMakeBuild})
