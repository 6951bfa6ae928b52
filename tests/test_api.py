"""The plain API and the generate CLI, end to end with a real SentencePiece tokenizer."""
import io
import subprocess
import sys

import pytest
import torch

import llama


@pytest.fixture(scope="module")
def lm(tokenizer):
    cfg = llama.ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size,
                            max_seq_len=128, multiple_of=16)
    torch.manual_seed(0)
    return llama.LLaMA(llama.build(cfg).eval(), tokenizer)


@pytest.mark.parametrize("fmt", ["native", "hf", "llama2c-pt", "llama2c-bin-v1"])
def test_save_load_generate_round_trip(lm, tmp_path, fmt):
    path = tmp_path / ("ckpt.bin" if fmt.startswith("llama2c-bin") else "ckpt.pt" if fmt == "llama2c-pt" else "ckpt")
    llama.save(lm, path, format=fmt)
    loaded = llama.load(path, device="cpu")
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == lm.tokenizer.vocab_size
    expected = lm.generate("Once upon a time", max_new_tokens=20, temperature=0)
    assert loaded.generate("Once upon a time", max_new_tokens=20, temperature=0) == expected
    assert isinstance(expected, str) and len(expected) > 0


def test_batch_and_stream(lm):
    texts = lm.generate(["The cat", "It was a dark and stormy"], max_new_tokens=12, temperature=0.9, seed=3)
    assert isinstance(texts, list) and len(texts) == 2
    assert texts == lm.generate(["The cat", "It was a dark and stormy"], max_new_tokens=12, temperature=0.9, seed=3)
    out = io.StringIO()
    text = lm.generate("The cat", max_new_tokens=15, temperature=0, stream=out)
    assert out.getvalue() == text
    # Batched prompts of different lengths give each prompt the continuation it gets alone.
    assert lm.generate(["The cat", "It was a dark and stormy"], max_new_tokens=12, temperature=0)[0] == \
        lm.generate("The cat", max_new_tokens=12, temperature=0)


def test_api_errors(lm):
    with pytest.raises(ValueError, match="tokenizer: this model was loaded without one"):
        llama.LLaMA(lm.model).generate("hi")
    with pytest.raises(TypeError, match="prompt: expected a string"):
        lm.generate(3)
    with pytest.raises(ValueError, match="stream: only a single prompt"):
        lm.generate(["a", "b"], stream=io.StringIO())


@pytest.mark.slow
def test_generate_cli(lm, tmp_path):
    llama.save(lm, tmp_path / "m", format="native")
    cmd = [sys.executable, "-m", "llama.generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "Once upon",
           "--max-new-tokens", "16", "--temperature", "0", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    expected = lm.generate("Once upon", max_new_tokens=16, temperature=0)
    assert result.stdout.rstrip("\n") == "Once upon" + expected
    assert "tokens in" in result.stderr and "Warning" not in result.stderr
    bad = subprocess.run(cmd[:5] + ["--temperature", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error: temperature" in bad.stderr
    # A config override past the trained context, on the command line.
    longer = cmd[:-6] + ["--max-new-tokens", "150", "--temperature", "0", "--device", "cpu",
                         "rope_scaling=dynamic", "rope_scaling_factor=2"]
    result = subprocess.run(longer, capture_output=True, text=True, check=True)
    assert "tokens in" in result.stderr
    bad = subprocess.run(cmd + ["dim=128"], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected shape" in bad.stderr
