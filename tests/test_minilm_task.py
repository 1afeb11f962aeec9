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


def test_a_short_run_agrees_step_by_step():
    """float64 (the float32 kernels are the same source; compiling them again would double the
    test's time): three AdamW steps of level b."""
    cfg = minilm.MinilmConfig(
        level="b", dtype="float64", limit=12, epochs=1, batch_size=4, check_batch=2
    )
    report = minilm.run(cfg)
    assert len(report["symgrad_losses"]) == 3 == len(report["torch_losses"])
    assert report["max_loss_rel_diff"] <= 1e-10
    drift = report["param_rel_diff"]
    # the key bias's gradient is exactly 0: AdamW turns both sides' rounding noise into ±lr steps
    assert max(v for n, v in drift.items() if not n.endswith("key.bias")) <= 1e-9
    assert len(drift) == 18
    assert report["symgrad_accuracy"] == report["torch_accuracy"]
    assert "spam F1" in minilm.format_table(report)


def test_bad_options_are_named():
    with pytest.raises(SymgradError, match="--level must be one of"):
        minilm.run(minilm.MinilmConfig(level="z"))
    with pytest.raises(SymgradError, match="dtype must be float32 or float64"):
        minilm.run(minilm.MinilmConfig(dtype="float16"))


def test_spam_f1():
    labels = np.array([1, 1, 0, 0, 1])
    predicted = np.array([1, 0, 0, 1, 1])
    assert minilm.f1_spam(labels, predicted) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_cli_writes_the_report_and_the_plot(tmp_path, capsys):
    from symgrad.cli import main

    out = tmp_path / "out"
    code = main(
        [
            "finetune",
            "--task",
            "sms-minilm",
            "--level",
            "a",
            "--limit",
            "8",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads((out / "sms_minilm_report.json").read_text())
    assert report["config"]["level"] == "a" and report["train_messages"] == 8
    for key in ("symgrad_accuracy", "torch_accuracy", "symgrad_f1_spam", "epoch_time_ratio"):
        assert key in report
    assert (out / "sms_minilm_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "float64 agreement with torch (forward 1e-10, gradients 1e-8): yes" in (
        capsys.readouterr().out
    )
