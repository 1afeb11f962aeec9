"""The MiniLM fine-tuning task on a few real SMS messages: symgrad's encoder against the
Hugging Face twin — forward and every trainable gradient in float64, a short training run step
by step, the command's report.  The full run is a command (``symgrad finetune --task
sms-minilm``), not a test."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from symgrad.errors import SymgradError
from symgrad.tasks import minilm
from symgrad.tasks.sms import load_sms


@pytest.fixture(scope="module")
def few():
    """Six short real messages, both classes, as one batch."""
    split = load_sms(0)
    order = np.argsort([len(t) for t in split.train_texts])
    ham = [i for i in order if split.train_labels[i] == 0][:4]
    spam = [i for i in order if split.train_labels[i] == 1][:2]
    idx = np.array(ham + spam)
    texts = [split.train_texts[i] for i in idx]
    return minilm._data(texts, split.train_labels[idx], max_length=32)


@pytest.mark.parametrize("level", ["a", "b"])
def test_forward_and_every_trainable_gradient_equal_hugging_face(few, level):
    check = minilm.agreement_check(level, few)
    assert check["forward_rel_diff"] <= 1e-10
    assert check["max_grad_rel_diff"] <= 1e-8
    # level a trains the head (2 tensors), b also the top layer's 16
    assert check["grad_tensors"] == {"a": 2, "b": 18}[level]
    # of those, only the top layer's key bias has a zero gradient (see the next test)
    zero = check["zero_gradient_tensors"]
    assert set(zero) == ({"encoder.layer.5.attention.self.key.bias"} if level == "b" else set())
    assert all(ratio <= 1e-15 for ratio in zero.values())


def test_the_key_bias_cannot_change_the_loss(few):
    """Why its gradient is 0 (the claim the main job prints when the key bias drifts): it adds
    q·b/√d to every score of a query's row, and softmax is unchanged by a shift of a whole row.
    Checked in the twin, independently of symgrad: a large random change of every layer's key
    bias leaves the logits equal to float64 rounding, while the same change of the query bias
    does not."""
    import torch

    from symgrad.torch.sms import TwinRunner

    rng = np.random.default_rng(1)
    head = {"weight": rng.normal(size=(2, 384)) / 20, "bias": np.zeros(2)}
    twin = TwinRunner(head, np.float64, 6)
    ids, mask, _ = few.batch(np.arange(len(few.labels)))
    before = twin.logits(ids, mask, None).detach().numpy()
    params = dict(twin.model.named_parameters())
    for which, unchanged in (("key", True), ("query", False)):
        with torch.no_grad():
            for layer in range(6):
                bias = params[f"encoder.encoder.layer.{layer}.attention.self.{which}.bias"]
                bias.add_(torch.from_numpy(rng.normal(size=bias.shape)))
        after = twin.logits(ids, mask, None).detach().numpy()
        change = np.max(np.abs(after - before)) / np.max(np.abs(before))
        assert (change <= 1e-12) == unchanged, (which, change)


def test_a_short_run_agrees_step_by_step():
    """float64 (the float32 kernels are the same source; compiling them again would double the
    test's time): three steps of level b."""
    cfg = minilm.MinilmConfig(
        level="b", dtype="float64", limit=12, epochs=1, batch_size=4, check_batch=2
    )
    report = minilm.run(cfg)
    assert len(report["symgrad_losses"]) == 3 == len(report["torch_losses"])
    assert report["max_loss_rel_diff"] <= 1e-10
    drift = report["param_rel_diff"]
    # the key bias's gradient is exactly 0: its update is both sides' rounding noise, which Adam
    # scales up; every other tensor agrees
    assert max(v for n, v in drift.items() if not n.endswith("key.bias")) <= 1e-9
    assert report["max_param_rel_diff_other"] <= 1e-9
    assert len(drift) == 18
    assert report["symgrad_accuracy"] == report["torch_accuracy"]
    (epoch,) = report["epochs"]
    assert epoch["train_loss"] == pytest.approx(np.mean(report["symgrad_losses"]))
    assert epoch["val_loss"] == pytest.approx(epoch["torch_val_loss"], rel=1e-10)
    assert epoch["val_acc"] == epoch["torch_val_acc"]
    sizes = (report["train_messages"], report["val_messages"], report["test_messages"])
    assert sizes == (12, 3, 12)
    text = minilm.format_report(report)
    assert "spam F1" in text and "frozen encoder + new head" in text
    assert "precision" in report["classification_report"]


def test_the_classification_report_is_scikit_learns():
    from sklearn.metrics import classification_report

    labels = np.array([0, 0, 1, 1, 0])
    predicted = np.array([0, 1, 1, 0, 0])
    text = minilm.classification_report(labels, predicted)
    assert text == classification_report(labels, predicted, target_names=["ham", "spam"], digits=4)
    assert "ham" in minilm.classification_report(np.zeros(3, int), np.zeros(3, int))


def test_bad_options_are_named():
    from symgrad.errors import OptionError

    with pytest.raises(SymgradError, match="--level must be one of"):
        minilm.run(minilm.MinilmConfig(level="z"))
    with pytest.raises(SymgradError, match="dtype must be float32 or float64"):
        minilm.run(minilm.MinilmConfig(dtype="float16"))
    for bad in ({"epochs": 0}, {"limit": 0}, {"limit": -5}, {"seed": -1}, {"batch_size": 0}):
        with pytest.raises(OptionError, match=next(iter(bad))):
            minilm.run(minilm.MinilmConfig(**bad))


def test_spam_f1():
    labels = np.array([1, 1, 0, 0, 1])
    predicted = np.array([1, 0, 0, 1, 1])
    assert minilm.f1_spam(labels, predicted) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_level_a_writes_the_report_and_the_plot(tmp_path, capsys):
    """Level a: the head on the frozen encoder's embeddings (it is the baseline: none beside
    it)."""
    from symgrad.cli import main

    out = tmp_path / "out"
    code = main(
        ["finetune", "--level", "a", "--limit", "8", "--epochs", "1", "--out", str(out), "--quiet"]
    )
    assert code == 0
    report = json.loads((out / "sms_minilm_report.json").read_text())
    assert report["config"]["level"] == "a" and report["train_messages"] == 8
    assert report["baseline"] is None and report["head_lr"] == 1e-3
    for key in ("symgrad_accuracy", "torch_accuracy", "symgrad_f1_spam", "epoch_time_ratio"):
        assert key in report
    assert (out / "sms_minilm_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr()
    assert "float64 agreement with torch (forward 1e-10, gradients 1e-8): yes" in printed.out
    assert printed.err == ""  # --quiet: no progress
