"""llama.classify.pipeline (base model, every method, the peer row, the report), mean pooling,
the cost figures train_classifier reports, and `python -m llama.data fetch-sentiment`."""
import hashlib
import io
import json
import random
import urllib.error

import pytest
import torch

import llama
from llama.classify import ClassifierModel, Example, train_classifier
from llama.classify.pipeline import PipelineConfig, dataset_files, main, review_text, run_pipeline
from llama.data import ChecksumError, SampleUnavailable
from llama.data import sentiment as senti
from llama.data.__main__ import main as data_main
from llama.tokenizer import train as train_tokenizer

GOOD = ["good", "nice", "great", "superb"]
BAD = ["bad", "dull", "awful", "boring"]
MID = ["okay", "average", "fair"]
FILLER = ["the", "film", "was", "a", "plot", "is", "and", "actors", "it"]


def sentence(rng, label, words=(BAD, GOOD)):
    out = [rng.choice(FILLER) for _ in range(rng.randint(2, 9))]
    out.insert(rng.randint(0, len(out)), rng.choice(words[label]))
    return " ".join(out)


def write_dataset(folder, name, names, sizes=(160, 60), rng=None, words=(BAD, GOOD)):
    """NAME-{train,dev,test}.txt in both line formats and NAME-label-mapping.json; the label
    follows from which word list a sentence draws from."""
    rng = rng or random.Random(0)
    n = len(names)
    rows = {split: [(label, sentence(rng, label, words)) for label in (rng.randrange(n) for _ in range(size))]
            for split, size in zip(("train", "dev"), sizes)}
    (folder / f"{name}-train.txt").write_text("".join(f"{y} ||| {s}\n" for y, s in rows["train"]))
    (folder / f"{name}-dev.txt").write_text("".join(f"d{i} ||| {y} ||| {s}\n" for i, (y, s) in enumerate(rows["dev"])))
    (folder / f"{name}-test.txt").write_text("".join(f"t{i} ||| -1 ||| {s}\n" for i, (_, s) in enumerate(rows["dev"][:7])))
    (folder / f"{name}-label-mapping.json").write_text(json.dumps(names))
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sentiment")
    write_dataset(folder, "two", ["bad", "good"], rng=random.Random(1))
    write_dataset(folder, "three", ["bad", "okay", "good"], rng=random.Random(2), words=(BAD, MID, GOOD))
    return folder


TINY = [
    "datasets=[two, three]", "botchan=false", "vocab_size=300", "pretrain.model=stories260K",
    "pretrain.model_overrides=[dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=128, max_seq_len=64]",
    "pretrain.seq_len=32", "pretrain.batch_size=8", "pretrain.max_steps=20", "pretrain.warmup_steps=2",
    "pretrain.eval_every=10", "pretrain.eval_batches=2", "pretrain.log_every=5", "classify.epochs=4",
    "classify.batch_size=16", "classify.pooling=mean", "per_method.finetune.lr=3e-3", "per_method.lora.lr=1e-2",
    "per_method.qlora.lr=1e-2", "classify.lora_rank=4", "progress=false",
]


@pytest.fixture(scope="module")
def pipeline_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    cfg = PipelineConfig.from_spec(None, TINY + [f"data_dir={data_dir}", f"out_dir={out}"])
    return out, run_pipeline(cfg)


def test_pipeline_runs_every_method_and_the_peer(pipeline_run):
    out, results = pipeline_run
    runs = {(r["dataset"], r["method"]): r for r in results["runs"]}
    assert set(runs) == {(d, m) for d in ("two", "three") for m in ("bow", "prompt", "finetune", "lora", "qlora")}
    for d, chance in (("two", 0.5), ("three", 1 / 3)):
        assert runs[d, "bow"]["dev_accuracy"] > chance + 0.3  # the peer is trained, never a constant
        for m in ("finetune", "lora", "qlora"):
            r = runs[d, m]
            assert r["dev_accuracy"] > chance + 0.2, (d, m, r["dev_accuracy"])
            assert r["step_seconds"] > 0 and r["peak_bytes"] > r["model_bytes"] > 0
            assert r["stage_seconds"] > r["seconds"] > 0  # the stage adds loading, predicting and saving
            assert (out / d / m / "model" / "classifier.json").is_file()
        assert runs[d, "finetune"]["trainable_params"] > runs[d, "lora"]["trainable_params"] > 0
        assert runs[d, "lora"]["trainable_params"] == runs[d, "qlora"]["trainable_params"]
        assert runs[d, "qlora"]["model_bytes"] < runs[d, "lora"]["model_bytes"]  # a 4-bit base
        assert runs[d, "prompt"]["trainable_params"] == 0
        lines = (out / d / "lora" / "dev-predictions.txt").read_text().splitlines()
        assert len(lines) == 60 and all(" ||| " in line for line in lines)
        assert len((out / d / "qlora" / "test-predictions.txt").read_text().splitlines()) == 7
        assert (out / d / "finetune" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for chart in ("accuracy.png", "cost.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "bag of words (peer)" in table and "QLoRA" in table and "## three" in table
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    assert (out / "pretrain" / "final").is_dir()
    assert results["pretrain"]["prepare_seconds"] > 0 and results["pretrain"]["seconds"] > 0
    reviews = (out / "text" / "reviews.txt").read_text().splitlines()
    assert len(reviews) == 2 * 160 and "|||" not in "".join(reviews)  # train sentences, labels dropped
    manifest = json.loads((out / "tokens" / "reviews" / "manifest.json").read_text())
    assert manifest["split"] == "line" and manifest["train_documents"] + manifest["val_documents"] == 2 * 160


def test_pipeline_rerun_keeps_finished_runs(pipeline_run, data_dir, capsys):
    out, results = pipeline_run
    stamp = (out / "two" / "lora" / "result.json").stat().st_mtime_ns
    code = main(["--data-dir", str(data_dir), "--out", str(out), *TINY])
    assert code == 0
    assert (out / "two" / "lora" / "result.json").stat().st_mtime_ns == stamp
    again = json.loads((out / "results.json").read_text())
    assert [r["dev_accuracy"] for r in again["runs"]] == [r["dev_accuracy"] for r in results["runs"]]
    assert "results:" in capsys.readouterr().out


def test_pipeline_from_a_given_base(data_dir, tmp_path):
    """`base` skips pretraining: any checkpoint with its tokenizer."""
    text = tmp_path / "text.txt"
    text.write_text(review_text([dataset_files(data_dir, "two")]))
    tok = train_tokenizer([text], 300, tmp_path / "tok", quiet=True)
    torch.manual_seed(0)
    llama.save(llama.LLaMA(llama.build(llama.ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=300,
                                                         max_seq_len=64)), tok), tmp_path / "base")
    cfg = PipelineConfig.from_spec(None, [f"data_dir={data_dir}", f"out_dir={tmp_path / 'out'}", "datasets=[two]",
                                          f"base={tmp_path / 'base'}", "methods=[prompt, lora]", "bow=false",
                                          "classify.epochs=1", "progress=false"])
    results = run_pipeline(cfg)
    assert [r["method"] for r in results["runs"]] == ["prompt", "lora"]
    assert not (tmp_path / "out" / "pretrain").exists()


@pytest.mark.parametrize("overrides, message", [
    (["colour=red"], "unknown key 'colour'"),
    (["methods=[lora, dance]"], "methods: expected some of"),
    (["classify.lr=fast"], "classify.lr: expected a number"),
    (["classify.speed=1"], "classify: unknown setting 'speed'"),
    (["classify.pooling=max"], "classify.pooling: expected one of last, mean"),
    (["per_method.sing.lr=1"], "per_method: unknown method 'sing'"),
    (["per_dataset.imdb.lr=x"], "per_dataset.imdb.lr: expected a number"),
    (["per_dataset_method.sst={lr: 1}"], "per_dataset_method: expected keys DATASET.METHOD"),
    (["per_dataset_method.sst.dance.lr=1"], "per_dataset_method: expected keys DATASET.METHOD"),
    (["pretrain.max_stepz=3"], "pretrain: unknown key(s) max_stepz"),
    (["pretrain.lr=-1"], "pretrain: lr: expected a number in [0.0, inf)"),
    (["vocab_size=70000"], "vocab_size: expected an integer in [100, 65535]"),
    (["datasets=[a, a]"], "datasets: expected distinct"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError) as e:
        PipelineConfig.from_spec(None, overrides)
    assert message in str(e.value)


def test_cli_errors(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "classify.epochs=0.5"]) == 2
    assert "classify.epochs: expected an integer" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "datasets=[two]"]) == 2
    assert "data_dir" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    assert main(["--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "datasets=[two]"]) == 2
    err = capsys.readouterr().err
    assert "two-label-mapping.json" in err and "fetch-sentiment" in err


def test_the_real_config_reads():
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "configs" / "classify" / "reviews.yaml"
    cfg = PipelineConfig.from_spec(path)
    assert cfg.datasets == ["sst", "cfimdb"] and set(cfg.methods) == {"prompt", "finetune", "lora", "qlora"}
    assert cfg.settings("cfimdb", "lora")["pooling"] == "mean"
    # one dataset of the config: its settings for the other one stay, unused
    one = PipelineConfig.from_spec(path, ["datasets=[cfimdb]"])
    assert one.settings("cfimdb", "qlora") == cfg.settings("cfimdb", "qlora")
    changed = PipelineConfig.from_spec(path, ["per_dataset_method.sst.qlora.lr=5e-4", "per_dataset.sst.epochs=2"])
    assert changed.settings("sst", "qlora")["lr"] == 5e-4  # only the named entry moves
    assert changed.settings("sst", "lora")["lr"] == cfg.settings("sst", "lora")["lr"] != 5e-4
    assert changed.settings("sst", "finetune")["epochs"] == 2


# ----------------------------------------------------------------------------- pooling and cost figures
def test_mean_pooling_ignores_padding():
    torch.manual_seed(0)
    base = llama.build(llama.ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=32))
    net = ClassifierModel(base, 3, dropout=0.0, pooling="mean").eval()
    tokens = torch.randint(3, 50, (3, 11))
    lengths = torch.tensor([11, 4, 7])
    batch = net(tokens, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = net(tokens[i:i + 1, :n], lengths[i:i + 1])
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        h = base(tokens[i:i + 1, :n], return_hidden=True)[0].mean(0)
        torch.testing.assert_close(alone[0], net.head(h), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pooling: expected one of last, mean"):
        ClassifierModel(base, 3, pooling="max")


def test_train_classifier_reports_its_cost():
    rng = random.Random(3)
    train = [Example(y, sentence(rng, y)) for y in (rng.randrange(2) for _ in range(24))]
    torch.manual_seed(0)
    model = llama.build(llama.ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=300, max_seq_len=64))

    class Bytes:  # a byte tokenizer is enough here
        pad_id, eos_id, vocab_size = 0, 2, 300

        def encode(self, s, bos=True, eos=False):
            return [1] + [3 + b for b in s.encode()[:60]]

    result = train_classifier(model, Bytes(), train, train[:8], "lora", epochs=2, batch_size=8, lora_rank=2,
                              measure_memory=True, progress=False)
    adapters = sum(p.numel() for n, p in result.classifier.model.named_parameters() if p.requires_grad)
    assert result.trainable_params == adapters > 0
    assert result.step_seconds > 0
    assert result.model_bytes == sum(t.numel() * t.element_size() for t in
                                     (*result.classifier.model.parameters(), *result.classifier.model.buffers()))
    assert result.peak_bytes > result.model_bytes


# ----------------------------------------------------------------------------- fetch-sentiment
@pytest.fixture
def fake_remote(monkeypatch):
    """Two small files served in place of GitHub, with their checksums pinned."""
    files = {"a-train.txt": b"1 ||| fine\n0 ||| poor\n", "a-label-mapping.json": b'["bad", "good"]'}
    monkeypatch.setattr(senti, "SENTIMENT_FILES", {n: (hashlib.sha256(b).hexdigest(), len(b)) for n, b in files.items()})
    served = []

    def urlopen(url, timeout):
        name = url.rsplit("/", 1)[-1]
        served.append(name)
        return io.BytesIO(files[name])

    monkeypatch.setattr(senti.urllib.request, "urlopen", urlopen)
    return files, served


def test_fetch_sentiment_downloads_checks_and_keeps(fake_remote, tmp_path, capsys):
    files, served = fake_remote
    assert data_main(["fetch-sentiment", "--out", str(tmp_path / "s")]) == 0
    assert "2 files" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == files
    served.clear()
    senti.fetch_sentiment(tmp_path / "s")
    assert served == []  # checked files are kept
    (tmp_path / "s" / "a-train.txt").write_bytes(b"changed")
    senti.fetch_sentiment(tmp_path / "s")
    assert served == ["a-train.txt"] and (tmp_path / "s" / "a-train.txt").read_bytes() == files["a-train.txt"]


def test_fetch_sentiment_refuses_a_wrong_file(fake_remote, monkeypatch, tmp_path):
    monkeypatch.setattr(senti.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not the file"))
    with pytest.raises(ChecksumError, match="a-train.txt"):
        senti.fetch_sentiment(tmp_path)
    assert not (tmp_path / "a-train.txt").exists()


def test_fetch_sentiment_without_a_network_says_what_to_get(monkeypatch, tmp_path, capsys):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(senti.urllib.request, "urlopen", offline)
    with pytest.raises(SampleUnavailable, match="cfimdb-dev.txt.*neubig/minllama-assignment"):
        senti.fetch_sentiment(tmp_path)
    assert data_main(["fetch-sentiment", "--out", str(tmp_path)]) == 1
    assert "error: cannot download" in capsys.readouterr().err
