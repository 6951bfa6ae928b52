"""Import names that cannot clash: the ops package is `llama_kernels`, nothing of ours answers to
`import kernels` (Hugging Face's package, which transformers requires), old environment variable
names are pointed out, and a foreign `llama` or `llama_kernels` fails with a clear message."""
import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import llama_kernels
from llama_kernels import dispatch
from tests.helpers import transformers_installed

ROOT = Path(__file__).resolve().parents[1]

# Run in a subprocess with a stand-in `kernels` package first on PYTHONPATH.
USE_MODEL = textwrap.dedent("""
    import sys
    import torch
    import kernels
    assert getattr(kernels, "STAND_IN", False), f"import kernels gave {kernels.__file__}"
    import llama
    import llama_kernels
    from llama.generate import generate
    torch.manual_seed(0)
    model = llama.build(llama.ModelConfig.preset("stories260K")).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 7, 42, 3]]))
    assert logits.shape == (1, 4, 512) and bool(torch.isfinite(logits).all())
    (new,) = generate(model, [[1, 7, 42]], max_new_tokens=1, seed=0)
    assert len(new) == 1 and 0 <= new[0] < 512
    y = llama_kernels.rms_norm(torch.randn(3, 8), torch.ones(8))
    assert sys.modules["kernels"] is kernels and getattr(kernels, "STAND_IN", False)
    print("ok", llama_kernels.__file__)
""")


@functools.lru_cache(maxsize=None)
def _installed() -> bool:
    """Whether llama and llama_kernels import from a directory outside the repo (an install)."""
    probe = "import importlib.util as u; print(all(u.find_spec(n) for n in ('llama', 'llama_kernels')))"
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": ""})
    return out.stdout.strip() == "True"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """A directory holding a top-level package `kernels` that is neither ours nor Hugging Face's."""
    path = tmp_path_factory.mktemp("stand_in")
    (path / "kernels").mkdir()
    (path / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    return path


def _env(*front: Path) -> dict:
    """This environment with `front` first on PYTHONPATH; the repo after it when the project is
    not installed (a plain checkout), so the test runs either way."""
    paths = [str(p) for p in front] + ([] if _installed() else [str(ROOT)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    for name in ("LLAMA_KERNELS_BACKEND", *dispatch.OLD_ENV_NAMES):
        env.pop(name, None)
    return env


def _run(args, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["outside", "repo-root"])
def test_model_and_cli_work_beside_another_kernels_package(where, stand_in, tmp_path):
    cwd = tmp_path if where == "outside" else ROOT
    env = _env(stand_in)
    result = _run(["-c", USE_MODEL], cwd, env)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]
    result = _run(["-m", "llama.generate", "--help"], cwd, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage:") and "--checkpoint" in result.stdout
    assert result.stderr == ""


def test_nothing_of_ours_is_a_kernels_package():
    assert not (ROOT / "kernels").exists()
    assert llama_kernels.__name__ == "llama_kernels"
    assert llama_kernels.capabilities().ext.__name__ == "llama_kernels._C"
    assert logging.getLogger("llama_kernels") is dispatch.log


@pytest.mark.hf
@pytest.mark.parametrize("where", ["outside", "repo-root"])
def test_transformers_imports_beside_us(where, tmp_path):
    """transformers imports its own `kernels` (when it has one) from any directory, ours too."""
    if not transformers_installed():
        pytest.skip("transformers is not installed")
    probe = textwrap.dedent("""
        import importlib.metadata, importlib.util
        import transformers
        from transformers import LlamaForCausalLM
        import llama, llama_kernels
        spec = importlib.util.find_spec("kernels")
        print(spec.origin if spec else None)
        print(importlib.metadata.packages_distributions().get("kernels", []))
    """)
    result = _run(["-c", probe], tmp_path if where == "outside" else ROOT, _env())
    assert result.returncode == 0, result.stderr[-3000:]
    origin, owners = result.stdout.strip().splitlines()[-2:]
    assert origin == "None" or Path(origin).resolve().parent.parent != ROOT, origin
    assert "llama-kernels" not in owners and "llama_kernels" not in owners, owners


@pytest.mark.parametrize("old", dispatch.OLD_ENV_NAMES)
def test_old_environment_names_are_pointed_out(old, caplog):
    with caplog.at_level(logging.WARNING, logger="llama_kernels"):
        assert dispatch.warn_old_env_names({old: "1", "PATH": "/bin"}) == [old]
    (record,) = caplog.records
    assert record.getMessage() == f"{old} is set but no longer read; set LLAMA_{old} instead"
    assert dispatch.warn_old_env_names({"LLAMA_" + old: "1", "KERNELS_CACHE": "/tmp"}) == []


def test_old_backend_variable_warns_once_at_import_and_is_not_read(tmp_path):
    env = {**_env(), "KERNELS_BACKEND": "triton"}
    code = "import llama_kernels, torch; print(llama_kernels.dispatch.forced_backend())"
    result = _run(["-c", code], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "None"
    assert result.stderr.strip().splitlines() == [
        "KERNELS_BACKEND is set but no longer read; set LLAMA_KERNELS_BACKEND instead"]


def test_a_foreign_llama_package_fails_clearly(tmp_path):
    """Our modules under someone else's `llama/__init__.py` (files mixed by an install) refuse to load."""
    shutil.copytree(ROOT / "llama", tmp_path / "llama", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "llama" / "__init__.py").write_text('"""Some other project named llama."""\n')
    result = _run(["-c", "import llama.model"], tmp_path, _env(tmp_path))
    assert result.returncode != 0
    assert "ImportError: `import llama` gave a package from" in result.stderr
    assert ", not the `llama` of llama-kernels; remove or rename it" in result.stderr


def test_a_foreign_llama_kernels_fails_clearly(tmp_path):
    (tmp_path / "llama_kernels").mkdir()
    (tmp_path / "llama_kernels" / "__init__.py").write_text('"""Some other project\'s ops."""\n')
    result = _run(["-c", "import llama"], tmp_path, _env(tmp_path))
    assert result.returncode != 0
    assert "ImportError: llama: `import llama_kernels` gave" in result.stderr
    assert ", not the ops package of llama-kernels; remove it" in result.stderr


def test_versions_agree():
    import llama

    assert llama.__version__ == llama_kernels.__version__
    assert llama.DISTRIBUTION == llama_kernels.DISTRIBUTION == "llama-kernels"
