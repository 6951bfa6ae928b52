import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. It must be set
# before any kernel is decorated, so before llama_kernels.triton.* is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Set-ups that force a backend would leak into every test.
os.environ.pop("LLAMA_KERNELS_BACKEND", None)

from tests.helpers import transformers_installed  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A Hugging Face parity test (marked `hf`) that skips where transformers is installed fails:
    such a skip has hidden a broken import before."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("hf") is not None and transformers_installed():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} skipped ({reason}) although transformers is installed; "
                           "the Hugging Face parity tests must run wherever it is")


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


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """A prepared token folder (llama.data.prepare) from generated text, with a 300-piece
    tokenizer trained on it: training tests need no network and no sample."""
    import random

    from llama.data import prepare
    from llama.tokenizer import train as train_tokenizer

    root = tmp_path_factory.mktemp("train-data")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(120)]
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(400))
    (root / "text.txt").write_text(text + "\n", encoding="utf-8")
    tok = train_tokenizer([root / "text.txt"], 300, root / "tok", quiet=True)
    prepare(tok, [root / "text.txt"], root / "shards", val_fraction=0.1, progress=False)
    return root / "shards"
