import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. It must be set
# before any kernel is decorated, so before kernels.triton.* is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Set-ups that force a backend would leak into every test.
os.environ.pop("KERNELS_BACKEND", None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def sample():
    """botchan.txt and a BPE model from the sentencepiece sdist; skips when pip cannot fetch it."""
    from llama.data import SampleUnavailable, sample_files

    try:
        return sample_files()
    except SampleUnavailable as exc:
        pytest.skip(f"sample data unavailable: {exc}")


@pytest.fixture(scope="session")
def tokenizer(sample, tmp_path_factory):
    """A 384-piece LLaMA-style BPE tokenizer trained on botchan.txt."""
    from llama.tokenizer import train

    return train([sample.text], 384, tmp_path_factory.mktemp("tok"), quiet=True)
