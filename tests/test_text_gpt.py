"""dataset=text and model=gpt_tiny: windows exactly as the text, a reproducible split, a causal model,
per-token evaluation, and a training run whose test loss falls."""

import hashlib
import json
import math
import random
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from curvature.errors import DataError
from curvature.models import GPTTiny, get_model
from curvature.text import DEFAULT_CORPUS, default_corpus_files, load_text, unigram_entropy
from curvature.training import evaluate
from experiments.run import dispatch
from tests.conftest import make_cfg, run_cli

# Learnable text for the training run: one sentence, accented letters included (2 UTF-8 bytes each).
SENTENCE = "Größe ist nicht alles; the fox jumps over dogs.\n"
# Text for the reader: random characters, so no two windows are equal and a window names its place.
RANDOM_TEXT = "".join(random.Random(0).choices("abcdéü xyz\n", k=2003))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "random.txt"
    path.write_bytes(RANDOM_TEXT.encode("utf-8"))
    return path


def _windows(data):
    """A split's windows as the strings they were cut from: the inputs plus the last target."""
    return [data.decode(x) + data.decode(y)[-1] for x, y in zip(data.inputs, data.targets)]


def test_windows_and_targets_are_the_text(text_file):
    splits = load_text(text_file, context=7, test_fraction=0.25, split_seed=3)
    assert splits.vocabulary == "".join(sorted(set(RANDOM_TEXT))) == "\n abcdxyzéü"
    assert splits.num_classes == 11 and splits.input_size == 7
    everything = [RANDOM_TEXT[8 * k: 8 * (k + 1)] for k in range(2003 // 8)]  # the last 3 characters dropped
    assert len(set(everything)) == len(everything) == 250
    train, test = _windows(splits.train), _windows(splits.test)
    assert len(test) == round(0.25 * 250) == 62 and len(train) == 188
    assert sorted(train + test) == sorted(everything)          # every window once: disjoint, complete
    for windows in (train, test):                               # in text order within a split
        assert [everything.index(w) for w in windows] == sorted(everything.index(w) for w in windows)
    assert torch.equal(splits.train.inputs[:, 1:], splits.train.targets[:, :-1])  # shifted by one
    assert splits.train.inputs.dtype == splits.train.targets.dtype == torch.int64
    assert splits.source["sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert splits.source["num_characters"] == 2003 and splits.source["files"] == [str(text_file)]
    counts = Counter("".join(splits.train.decode(y) for y in splits.train.targets))
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    assert unigram_entropy(splits.train) == pytest.approx(entropy, rel=1e-12)


def test_split_is_seeded_reproducible_and_independent_of_the_run_seed(text_file):
    def test_windows(split_seed, seed=0):
        return _windows(load_text(text_file, context=7, split_seed=split_seed, seed=seed).test)

    assert test_windows(0) == test_windows(0) == test_windows(0, seed=5)
    assert test_windows(0) != test_windows(1)


def test_val_and_subsample_come_out_of_train(text_file):
    full = load_text(text_file, context=7)
    part = load_text(text_file, context=7, val_size=5, num_subsamples=20, seed=1)
    assert len(part.val) == 5 and len(part.train) == 20 and _windows(part.test) == _windows(full.test)
    assert not set(_windows(part.val)) & set(_windows(part.train))
    assert set(_windows(part.val)) | set(_windows(part.train)) <= set(_windows(full.train))


def test_batches_keep_token_ids_whatever_the_dtype(text_file):
    data = load_text(text_file, context=7).train
    batches = list(data.batches(10, dtype=torch.float64))
    assert sum(len(x) for x, _ in batches) == len(data)
    assert all(x.dtype == y.dtype == torch.int64 and x.shape[1] == 7 for x, y in batches)
    with pytest.raises(ValueError, match="augmentation"):
        next(data.batches(10, augment=True))


def test_default_corpus_loads_and_records_its_hash():
    splits = load_text(context=32)
    files = default_corpus_files()
    assert [f.name for f in files] == list(DEFAULT_CORPUS)
    raw = b"".join(f.read_bytes() for f in files)
    assert splits.source["files"] == [str(f) for f in files] and splits.source["default_corpus"]
    assert splits.source["sha256"] == hashlib.sha256(raw).hexdigest()
    assert splits.source["num_characters"] == len(raw.decode("utf-8")) > 300_000
    assert splits.source["num_windows"] == len(splits.train) + len(splits.test)
    # character frequencies of code: well below the uniform log(V), and a positive entropy
    assert 0 < unigram_entropy(splits.train) < math.log(splits.num_classes)


@pytest.mark.parametrize("content, message", [(b"caf\xe9\n" * 50, "is not UTF-8 (byte 3 is 0xe9)"),
                                              (b"tiny", "too few")])
def test_bad_text_is_a_data_error(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(message)) as info:
        load_text(path, context=8)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="cannot be read"):
        load_text(tmp_path / "missing.txt")


def test_non_utf8_file_through_the_cli_exits_2_with_one_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait\n".encode("latin-1") * 100)
    out = tmp_path / "run"
    proc = run_cli("analysis=train", "dataset=text", f"dataset.path={path}", "model=gpt_tiny", "logger=none",
                   f"hydra.run.dir={out}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and str(path) in lines[-1] and "iconv" in lines[-1]
    assert "Traceback" not in proc.stderr and not (out / "results.json").exists()


# --- the model -------------------------------------------------------------------------------------

def test_gpt_tiny_shape_and_parameter_count():
    torch.manual_seed(0)
    model = get_model("gpt_tiny", 11, input_size=16, width=24, depth=3, heads=3)
    assert model(torch.randint(11, (5, 16))).shape == (5, 16, 11)
    assert model(torch.randint(11, (5, 9))).shape == (5, 9, 11)   # shorter than the context
    v, t, w = 11, 16, 24
    expected = v * w + t * w + 3 * (12 * w * w + 13 * w) + 2 * w + w * v + v
    assert sum(p.numel() for p in model.parameters()) == expected
    with pytest.raises(ValueError, match="longer than the context of 16"):
        model(torch.randint(11, (1, 17)))
    with pytest.raises(ValueError, match="multiple of heads"):
        GPTTiny(11, width=10, heads=3)


@pytest.mark.parametrize("train_mode", [False, True])
def test_gpt_tiny_is_causal_exactly(train_mode):
    torch.manual_seed(0)
    model = GPTTiny(13, context=12, width=16, depth=2, heads=4).double().train(train_mode)
    idx = torch.randint(13, (3, 12))
    with torch.set_grad_enabled(train_mode):
        base = model(idx)
        for t in range(11):
            changed = idx.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.arange(11 - t)) % 13  # every later token
            out = model(changed)
            assert torch.equal(out[:, :t + 1], base[:, :t + 1]), t
            assert not torch.equal(out[:, t + 1], base[:, t + 1]), t


def test_gpt_tiny_hessian_vector_products_by_both_routes_agree():
    """Curvature needs second derivatives through attention: forward-over-reverse and reverse-over-
    reverse products must exist and agree (float64)."""
    torch.manual_seed(0)
    model = GPTTiny(7, context=6, width=8, depth=1, heads=2).double()
    x, y = torch.randint(7, (3, 6)), torch.randint(7, (3, 6))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)).reshape(-1, 7), y.reshape(-1))

    vector = {k: torch.randn_like(v) for k, v in params.items()}
    forward = torch.func.jvp(torch.func.grad(loss), (params,), (vector,))[1]
    reverse = torch.func.vjp(torch.func.grad(loss), params)[1](vector)[0]
    for name in params:
        torch.testing.assert_close(forward[name], reverse[name], rtol=1e-10, atol=1e-12)


def test_evaluate_is_per_token_cross_entropy_and_accuracy(text_file):
    torch.manual_seed(0)
    data = load_text(text_file, context=7).test
    model = GPTTiny(data.num_classes, context=7, width=8, depth=1, heads=2).double()
    got = evaluate(model, data, batch_size=4, dtype=torch.float64)
    with torch.no_grad():
        logits = model(data.inputs).reshape(-1, data.num_classes)
    targets = data.targets.reshape(-1)
    assert got["loss"] == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-12)
    assert got["accuracy"] == float((logits.argmax(-1) == targets).double().mean())


def test_training_gpt_tiny_lowers_the_test_loss(tmp_path):
    text_file = tmp_path / "sentence.txt"
    text_file.write_bytes((SENTENCE * 200).encode("utf-8"))
    results = dispatch(make_cfg(tmp_path / "run", [
        "analysis=train", "dataset=text", f"dataset.path={text_file}", "dataset.context=8", "model=gpt_tiny",
        "model.width=16", "model.depth=1", "model.heads=2", "optimizer=adam", "optimizer.lr=0.01",
        "analysis.epochs=3", "analysis.check_test_loss=true", "dataset.batch_size=16", "dtype=float32"]))
    rows = results["tables"]["epochs"]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"] < math.log(len(set(SENTENCE)))
    checks = results["checks"]
    assert checks["test_loss_falls"]["passed"] and checks["test_loss_below_unigram"]["passed"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["data_source"]["sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
