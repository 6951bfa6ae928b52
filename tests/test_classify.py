"""llama.classify: data files, metrics, the four methods on a generated sentiment task, the CLI."""
import json
import random

import pytest
import torch

import llama
from llama.classify import (
    ClassifierModel, Example, accuracy, confusion_matrix, length_batches, load_classifier, macro_f1,
    parse_label_names, plot_confusion, prepare_model, read_examples, read_label_names, train_classifier,
    trainable_names, write_predictions,
)
from llama.classify.__main__ import main
from llama.lora import lora_layers
from llama.quantize import QuantLinear
from llama.tokenizer import train as train_tokenizer

GOOD = ["good", "nice", "great"]
BAD = ["bad", "dull", "awful"]
FILLER = ["the", "film", "was", "a", "plot", "is", "and"]
NAMES = ["bad", "good"]
CFG = dict(dim=32, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=64)
FAST = dict(epochs=2, batch_size=8, lora_rank=8, lora_alpha=16, quant_block_size=32, seed=0, progress=False)


def sentence(rng, label):
    words = [rng.choice(FILLER) for _ in range(rng.randint(1, 4))]
    words.insert(rng.randint(0, len(words)), rng.choice(GOOD if label else BAD))
    return " ".join(words)


def examples(rng, n):
    return [Example(label, sentence(rng, label)) for label in (rng.randint(0, 1) for _ in range(n))]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Generated train/dev/test sets (label 1 iff the sentence has a good-word), written in both
    file formats, and a 300-piece tokenizer trained on them."""
    root = tmp_path_factory.mktemp("classify")
    rng = random.Random(0)
    train, dev = examples(rng, 120), examples(rng, 80)
    (root / "text.txt").write_text("\n".join(e.sentence for e in train + dev) + "\n", encoding="utf-8")
    tok = train_tokenizer([root / "text.txt"], 300, root / "tok", quiet=True)
    (root / "train.txt").write_text("".join(f"{e.label} ||| {e.sentence}\n" for e in train), encoding="utf-8")
    (root / "dev.txt").write_text("".join(f"d{i} ||| {e.label} ||| {e.sentence}\n" for i, e in enumerate(dev)),
                                  encoding="utf-8")
    (root / "test.txt").write_text("".join(f"-1 ||| {e.sentence}\n" for e in dev[:10]), encoding="utf-8")
    (root / "labels.json").write_text(json.dumps(NAMES), encoding="utf-8")
    return dict(root=root, tok=tok, train=train, dev=dev)


def tiny(seed=0):
    torch.manual_seed(seed)
    return llama.build(llama.ModelConfig(**CFG))


@pytest.fixture(scope="module")
def checkpoint_dir(task, tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "model"
    llama.save(llama.LLaMA(tiny(), task["tok"]), path)
    return path


# ----------------------------------------------------------------------------- data files
def test_reads_both_formats(task):
    train = read_examples(task["root"] / "train.txt", 2)
    dev = read_examples(task["root"] / "dev.txt", 2)
    assert train == task["train"]
    assert [(e.label, e.sentence) for e in dev] == [(e.label, e.sentence) for e in task["dev"]]
    assert dev[3].id == "d3" and train[0].id is None


def test_label_names(tmp_path):
    (tmp_path / "sst.json").write_text('["awful", "bad", "average", "good", "excellent"]')
    assert read_label_names(tmp_path / "sst.json")[2] == "average"
    assert parse_label_names("bad, good") == ["bad", "good"]
    for text, message in (('{"a": 1}', "list of label names"), ('["x"]', "at least 2"), ('["a", "a"]', "twice"),
                          ("[1,", "not valid JSON")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            read_label_names(tmp_path / "bad.json")


@pytest.mark.parametrize("line, message", [
    ("no separator here", "expected 'label ||| sentence'"),
    ("x ||| a sentence", "not an integer"),
    ("1 ||| ", "sentence is empty"),
    ("2 ||| good film", "label 2 is out of range; expected 0..1"),
    ("id7 ||| 5 ||| good film", "label 5 is out of range"),
    ("-1 ||| good film", "placeholder label -1"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.txt"
    path.write_text(f"1 ||| good film\n\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        read_examples(path, 2)
    assert f"{path}:3:" in str(info.value)


def test_placeholder_labels_only_for_prediction(task, tmp_path):
    test = read_examples(task["root"] / "test.txt", 2, allow_placeholder=True)
    assert {e.label for e in test} == {-1}
    with pytest.raises(ValueError, match="placeholder"):
        read_examples(task["root"] / "test.txt", 2)
    with pytest.raises(ValueError, match="train_examples: example 0 has label -1"):
        train_classifier(tiny(), task["tok"], test, task["dev"], "finetune", label_names=NAMES, **FAST)
    with pytest.raises(ValueError, match="no gold labels"):
        accuracy([0] * len(test), [e.label for e in test])


def test_sentence_may_contain_the_separator(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("1 ||| a ||| b\nx9 ||| 0 ||| c ||| d\n", encoding="utf-8")
    assert [(e.id, e.label, e.sentence) for e in read_examples(path, 2)] == [(None, 1, "a ||| b"),
                                                                             ("x9", 0, "c ||| d")]


# ----------------------------------------------------------------------------- metrics
def test_metrics_and_confusion_plot(tmp_path):
    preds, gold = [0, 1, 1, 2, 2, 0], [0, 1, 2, 2, 1, 0]
    assert accuracy(preds, gold) == pytest.approx(4 / 6)
    cm = confusion_matrix(preds, gold, 3)
    assert cm.tolist() == [[2, 0, 0], [0, 1, 1], [0, 1, 1]]
    # per-label F1: 1, 0.5, 0.5; label 3 of 4 never occurs and is left out of the mean
    assert macro_f1(preds, gold, 4) == pytest.approx(2 / 3)
    assert macro_f1([1, 1], [1, 1], 2) == 1.0
    path = plot_confusion(cm, ["neg", "neu", "pos"], tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temporary file left
    with pytest.raises(ValueError, match="expected shape"):
        plot_confusion(cm, ["a", "b"], tmp_path / "x.png")


def test_write_predictions(tmp_path):
    exs = [Example(-1, "a film"), Example(-1, "the plot")]
    write_predictions(tmp_path / "p.txt", [1, 0], exs)
    assert (tmp_path / "p.txt").read_text() == "1 ||| a film\n0 ||| the plot\n"


# ----------------------------------------------------------------------------- which parameters train
def test_only_the_intended_parameters_get_gradients(task):
    from llama.classify import _pad_batch

    tokens, lengths = _pad_batch([task["tok"].encode(e.sentence) for e in task["train"][:4]], 0, "cpu")
    for method in ("finetune", "lora", "qlora"):
        net = prepare_model(tiny(), method, 2, lora_rank=4, lora_targets=("wq", "wv"), quant_block_size=32)
        assert isinstance(net, ClassifierModel)
        net(tokens, lengths).sum().backward()
        got = {name for name, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        if method == "finetune":
            expected = {name for name, _ in net.named_parameters()} - {"base.output.weight"}  # unused LM head
            assert trainable_names(net) == expected
        else:
            # B starts at zero, so A gets no gradient on the first step; B and the head do
            expected = {f"base.{n}.lora_B" for n in lora_layers(net.base)} | {"head.weight", "head.bias"}
            assert trainable_names(net) == expected | {f"base.{n}.lora_A" for n in lora_layers(net.base)}
            assert len(lora_layers(net.base)) == 4
        assert got == expected, method
        if method == "qlora":
            assert isinstance(net.base.layers[0].attention.wq.base, QuantLinear)
    frozen = prepare_model(tiny(), "prompt", 2)
    assert not trainable_names(frozen)


# ----------------------------------------------------------------------------- the methods learn
@pytest.mark.parametrize("method, lr", [("finetune", 3e-3), ("lora", 1e-2), ("qlora", 1e-2)])
def test_methods_learn_the_task(task, method, lr, tmp_path):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_classifier(model, task["tok"], task["train"], task["dev"], method, label_names=NAMES, lr=lr,
                              **FAST)
    clf = result.classifier
    preds = clf.predict(task["dev"])
    acc = accuracy(preds, [e.label for e in task["dev"]])
    assert acc >= 0.85, (method, result.history)
    assert acc == pytest.approx(result.best_dev_accuracy)  # the best epoch's weights are the ones kept
    assert result.dev_predictions == preds  # made at that epoch, while training
    assert result.best_dev_accuracy == max(h["dev_accuracy"] for h in result.history)
    if method == "lora":  # the base weights did not move
        after, wrapped = model.state_dict(), lora_layers(model)
        for name, value in before.items():
            layer = name.rsplit(".", 1)[0]
            key = f"{layer}.base.weight" if layer in wrapped else name
            assert torch.equal(after[key], value), name
    # saved apart and loaded back, it predicts the same
    clf.save(tmp_path / "saved", pretrained=None)
    names = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"classifier.json", "head.safetensors"} <= names
    assert ("adapter" in names) == (method != "finetune") and ("config.json" in names) == (method == "finetune")
    loaded = load_classifier(tmp_path / "saved", base=None if method == "finetune" else tiny(),
                             tokenizer=task["tok"])
    assert loaded.predict(task["dev"]) == preds


def test_length_batches_cover_every_index_once_with_little_padding():
    rng = random.Random(1)
    lengths = [rng.randint(1, 200) for _ in range(1003)]
    plain = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    plain = [plain[k:k + 16] for k in range(0, len(plain), 16)]

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    for generator in (None, torch.Generator().manual_seed(0)):
        batches = length_batches(lengths, 16, generator, window=8)
        assert len(batches) == -(-len(lengths) // 16)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(1 <= len(b) <= 16 for b in batches)
        assert padded(batches) < 0.75 * padded(plain)
    ordered = length_batches(lengths, 16)
    assert [lengths[i] for b in ordered for i in b] == sorted(lengths, reverse=True)
    first = length_batches(lengths, 16, torch.Generator().manual_seed(3))
    assert first == length_batches(lengths, 16, torch.Generator().manual_seed(3))
    assert first != length_batches(lengths, 16, torch.Generator().manual_seed(4))


def test_scores_come_back_in_the_input_order(task):
    result = train_classifier(tiny(), task["tok"], task["train"][:16], None, "finetune", label_names=NAMES,
                              lr=1e-3, **{**FAST, "epochs": 1})
    clf, items = result.classifier, task["dev"][:21]
    alone = torch.cat([clf.scores([e]) for e in items])
    assert torch.allclose(clf.scores(items, batch_size=4), alone, atol=1e-5)


def test_training_is_deterministic(task):
    runs = []
    for _ in range(2):
        result = train_classifier(tiny(), task["tok"], task["train"][:40], task["dev"][:20], "lora",
                                  label_names=NAMES, lr=1e-2, **{**FAST, "epochs": 1})
        runs.append({k: v.clone() for k, v in result.classifier.model.state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_prompt_scores_labels_zero_shot(task):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_classifier(model, task["tok"], [], task["dev"][:12], "prompt", label_names=NAMES,
                              progress=False)
    clf = result.classifier
    scores = clf.scores(task["dev"][:12])
    assert scores.shape == (12, 2) and bool((scores < 0).all())  # summed log-probabilities
    preds = clf.predict(task["dev"][:12])
    assert set(preds) <= {0, 1} and 0.0 <= result.best_dev_accuracy <= 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a sentence longer than the model's context is cut to fit
    assert clf.predict(["good " * 200]) in ([0], [1])


# ----------------------------------------------------------------------------- the CLI
def _paths(task, tmp_path):
    r = task["root"]
    return dict(train=str(r / "train.txt"), dev=str(r / "dev.txt"), test=str(r / "test.txt"),
                labels=str(r / "labels.json"), dev_out=str(tmp_path / "dev-out.txt"),
                test_out=str(tmp_path / "test-out.txt"))


def test_cli_lora_with_minllama_spellings(task, checkpoint_dir, tmp_path, capsys):
    p = _paths(task, tmp_path)
    status = main(["--option", "lora", "--pretrained-model-path", str(checkpoint_dir), "--label_names", p["labels"],
                   "--train", p["train"], "--dev", p["dev"], "--test", p["test"], "--dev_out", p["dev_out"],
                   "--test_out", p["test_out"], "--epochs", "2", "--batch_size", "8", "--lr", "1e-2",
                   "--lora_rank", "8", "--lora_alpha", "16", "--seed", "3", "--device", "cpu", "--no-progress",
                   "--out", str(tmp_path / "best")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "dev accuracy:" in out and "macro-F1:" in out
    dev_lines = (tmp_path / "dev-out.txt").read_text().splitlines()
    assert len(dev_lines) == len(task["dev"])
    pairs = [line.split(" ||| ") for line in dev_lines]
    assert [s for _, s in pairs] == [e.sentence for e in task["dev"]] and {p for p, _ in pairs} <= {"0", "1"}
    assert len((tmp_path / "test-out.txt").read_text().splitlines()) == 10
    assert (tmp_path / "dev-out.confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "best" / "adapter" / "adapter_model.safetensors").is_file()
    acc = float(out.split("dev accuracy: ")[1].split()[0])
    assert acc >= 0.85


def test_cli_prompt_comma_label_names(task, checkpoint_dir, tmp_path, capsys):
    p = _paths(task, tmp_path)
    dev = tmp_path / "dev16.txt"
    dev.write_text("".join(task["root"].joinpath("dev.txt").read_text().splitlines(keepends=True)[:16]))
    assert main(["--option", "prompt", "--pretrained", str(checkpoint_dir), "--label-names", "bad,good",
                 "--dev", str(dev), "--dev-out", p["dev_out"], "--device", "cpu", "--no-progress"]) == 0
    assert "dev accuracy:" in capsys.readouterr().out
    assert len((tmp_path / "dev-out.txt").read_text().splitlines()) == 16
    assert (tmp_path / "dev-out.confusion.png").is_file()


def test_cli_refuses_bad_arguments(task, checkpoint_dir, tmp_path, capsys):
    p = _paths(task, tmp_path)
    (tmp_path / "broken.txt").write_text("1 ||| fine\nnot a line\n")
    base = ["--pretrained", str(checkpoint_dir), "--dev", p["dev"], "--device", "cpu", "--no-progress"]
    train = ["--option", "lora", "--train", p["train"]]
    cases = [
        (["--option", "magic"] + base, "--option: expected one of prompt, finetune, lora, qlora"),
        (["--option", "lora"] + base, "--train: --option lora needs a training file"),
        (["--option", "prompt"] + base, "--label-names: --option prompt needs the label names"),
        (train + base + ["--epochs", "0"], "--epochs: expected a positive number"),
        (train + base + ["--lr", "-1"], "--lr: expected a positive number"),
        (train + base + ["--seed", "-1"], "--seed"),
        (train + base + ["--device", "tpu"], "--device"),
        (train + ["--pretrained", str(tmp_path / "none"), "--dev", p["dev"]], "--pretrained"),
        (train + base + ["--test", p["test"]], "--test-out: needed with --test"),
        (train + base + ["--label-names", str(tmp_path / "missing.json")], "--label-names"),
        (train + base + ["--label-names", "bad"], "--label-names: 'bad' is neither a file"),
        (train + base + ["--dev-out", str(tmp_path)], "--dev-out"),
        (["--option", "lora", "--train", str(tmp_path / "broken.txt")] + base, "broken.txt:2: expected"),
        (["--option", "lora", "--train", p["test"]] + base, "test.txt:1: placeholder label -1"),
        (train + base + ["--label-names", "a,b,c", "--quant", "fp8"], "--quant"),
        (train + base + ["--out", str(checkpoint_dir)], "--out"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)


def test_bag_of_words_peer_learns_the_task_and_checks_its_input(task):
    from llama.classify.bow import bag_of_words, features

    assert features("A fine, fine film") == ["a", "fine", ",", "fine", "film", "a fine", "fine ,", ", fine",
                                             "fine film"]
    result = bag_of_words(task["train"], task["dev"], 2)
    assert result.dev_accuracy >= 0.95 and result.l2 > 0
    assert result.predict(["good " + task["dev"][0].sentence.replace("bad", "")])[0] == 1
    with pytest.raises(ValueError, match=r"train: labels must lie in \[0, 2\)"):
        bag_of_words([Example(3, "good")], task["dev"], 2)
    with pytest.raises(ValueError, match=r"num_labels"):
        bag_of_words(task["train"], task["dev"], 1)
