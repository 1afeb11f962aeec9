"""The main job as a user runs it: ``symgrad finetune`` with no options but a tiny ``--limit``,
as a process in an empty directory — every phase announced, the article's per-epoch lines,
scikit-learn's classification report, the headline, the files in the documented place, exit 0.

Also: the documented output place is the one the command uses (and git ignores), the README's
two set-up commands are the ones ``.ci/run`` runs, and the pieces of the headline (the sample,
the drift explanation, the report's consistency) on their own."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from symgrad import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("symgrad")
    found = str(script) if script.exists() else shutil.which("symgrad")
    return [found] if found else [sys.executable, "-m", "symgrad"]


@pytest.fixture(scope="module")
def default_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess, Path]:
    pytest.importorskip("transformers")
    cwd = tmp_path_factory.mktemp("user")
    done = subprocess.run(
        [*_console_script(), "finetune", "--limit", "4", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=cwd,
    )
    return done, cwd


def test_the_default_main_job_end_to_end(default_run):
    done, cwd = default_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out, err = done.stdout, done.stderr
    assert "Traceback" not in err
    # every phase is announced (progress on stderr), in order
    phases = [
        "reading the SMS spam collection",
        "float64 check",
        "loading all-MiniLM-L6-v2 into symgrad's encoder and the Hugging Face twin",
        "frozen-encoder baseline: embedding",
        "frozen-encoder baseline: training a new head",
        "epoch 1/1 · training both sides",
        "epoch 1/1 · validation, both sides",
        "test set · both sides",
        "writing the plot",
    ]
    positions = [err.find(p) for p in phases]
    assert -1 not in positions, [p for p, at in zip(phases, positions, strict=True) if at < 0]
    assert positions == sorted(positions)
    # the article's recipe and its per-epoch line
    assert "all 6 layers and the head trained, Adam lr 5e-05, batch 16, 1 epoch" in out
    assert re.search(
        r"^Epoch 1, Train Loss: \d\.\d{4}, Train Acc: \d\.\d{4}, Val Loss: \d\.\d{4}, "
        r"Val Acc: \d\.\d{4}$",
        out,
        re.MULTILINE,
    ), out
    assert re.search(r"precision\s+recall\s+f1-score\s+support", out)
    assert "torch twin: Train Loss" in out
    # the headline
    for row in (
        "symgrad, fine-tuned",
        "torch twin, fine-tuned",
        "frozen encoder + new head (baseline)",
    ):
        assert re.search(rf"^  {re.escape(row)}.* %\s+\d\.\d{{4}}$", out, re.MULTILINE), row
    assert "symgrad vs torch: float64 gradients of 98 tensors within" in out
    assert "training time per epoch" in out and "torch's time" in out
    assert "float64 agreement with torch (forward 1e-10, gradients 1e-8): yes" in out
    # the outputs, in the documented place, named by the last lines
    folder = cwd / "runs" / "sms-minilm"
    files = ["sms_minilm_report.json", "sms_minilm_summary.txt", "sms_minilm_losses.png"]
    for name in files:
        assert (folder / name).is_file(), name
    last = out.strip().splitlines()[-len(files) - 1 :]
    assert last[0] == f"Outputs (in {folder}):"
    assert [line.split()[0] for line in last[1:]] == [f"runs/sms-minilm/{n}" for n in files]
    assert (folder / "sms_minilm_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in cwd.rglob("*") if p.is_file()) == sorted(files)


def test_the_report_holds_what_the_headline_says(default_run):
    done, cwd = default_run
    folder = cwd / "runs" / "sms-minilm"
    report = json.loads((folder / "sms_minilm_report.json").read_text())
    cfg = report["config"]
    assert (cfg["level"], cfg["lr"], cfg["batch_size"], cfg["weight_decay"]) == ("c", 5e-5, 16, 0)
    assert (report["train_messages"], report["val_messages"], report["test_messages"]) == (4, 1, 4)
    assert len(report["epochs"]) == 1 and len(report["symgrad_losses"]) == 1
    epoch = report["epochs"][0]
    assert f"Epoch 1, Train Loss: {epoch['train_loss']:.4f}" in done.stdout
    assert epoch["train_loss"] == pytest.approx(report["symgrad_losses"][0])
    acc = f"{100 * report['symgrad_accuracy']:.2f} %"
    assert re.search(rf"symgrad, fine-tuned\s+{re.escape(acc)}", done.stdout)
    assert report["baseline"] is not None and 0 <= report["baseline"]["accuracy"] <= 1
    # the summary file is the printed classification report and headline
    summary = (folder / "sms_minilm_summary.txt").read_text()
    assert summary.strip() in done.stdout
    # float32 runs agree step by step (a single step here)
    assert report["max_loss_rel_diff"] <= 1e-4
    assert report["max_param_rel_diff_other"] <= 1e-4


def test_the_output_place_is_the_documented_one():
    """README says where ``symgrad finetune`` writes; the command writes there; git ignores it."""
    assert cli.default_out("sms-minilm") == Path("runs/sms-minilm")
    assert cli.default_out("digits") == Path("runs/digits")
    assert "runs/sms-minilm/" in README and "runs/digits/" in README
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "runs/" in ignored


def test_the_readme_set_up_commands_are_the_ones_ci_runs():
    """Exactly two commands on the first screen: the main job after install, the tests; the
    second is what ``.ci/run`` executes."""
    first_screen = README.split("\n## ", 2)
    setup = first_screen[1] if first_screen[1].startswith("Set-up") else ""
    blocks = re.findall(r"```bash\n(.*?)\n```", setup, re.DOTALL)
    assert len(blocks) == 2, blocks
    main_job, tests = blocks
    assert main_job.endswith(".venv/bin/symgrad finetune")
    ci = (ROOT / ".ci" / "run").read_text()
    install = tests.partition(" && .venv/bin/python -m pytest")[0]
    assert install in ci and ".venv/bin/python -m pytest" in ci


def test_the_readme_lists_every_command():
    import argparse

    section = README.split("## Command line", 1)[1].split("\n## ", 1)[0]
    (commands,) = [
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ]
    for name in commands.choices:
        assert f"`symgrad {name}" in section, name


# -- the pieces ------------------------------------------------------------------------------


def test_stratified_sample_keeps_each_class_share():
    from symgrad.tasks.minilm import stratified_sample

    labels = np.array([0] * 87 + [1] * 13)
    pick = stratified_sample(labels, 20, seed=3)
    assert len(pick) == 20 and len(set(pick)) == 20
    assert np.bincount(labels[pick]).tolist() == [17, 3]  # 17.4 and 2.6, largest remainder
    assert np.array_equal(pick, stratified_sample(labels, 20, seed=3))
    assert not np.array_equal(pick, stratified_sample(labels, 20, seed=4))
    assert np.array_equal(stratified_sample(labels, None, 0), np.arange(100))
    assert np.array_equal(stratified_sample(labels, 500, 0), np.arange(100))


def test_the_drift_explanation_names_only_a_known_cause():
    from symgrad.tasks.minilm import drift_explanation

    key = "encoder.layer.5.attention.self.key.bias"
    report = {
        "agreement_check_float64": {"zero_gradient_tensors": {key: 3e-18}},
        "param_rel_diff": {key: 2e-4, "head.weight": 1e-7},
        "max_param_rel_diff_other": 1e-7,
    }
    line = drift_explanation(report)
    assert line is not None
    assert "2.0e-04" in line and "key bias of 1 attention layer" in line
    assert "softmax does not change" in line and "3e-18" in line
    # no explanation when the zero-gradient tensor does not drift more than the others
    report["param_rel_diff"][key] = 1e-8
    assert drift_explanation(report) is None
    # nor for a drift without a zero gradient
    report["agreement_check_float64"]["zero_gradient_tensors"] = {}
    report["param_rel_diff"]["head.weight"] = 1e-2
    assert drift_explanation(report) is None


def test_console_labels_phases_and_keeps_results_apart():
    import io

    from symgrad.tasks.progress import SILENT, Console

    out, err = io.StringIO(), io.StringIO()
    console = Console(progress=True, out=out, err=err)
    with console.phase("loading"):
        pass
    assert list(console.bar([1, 2], "epoch 1/3")) == [1, 2]
    console.say("Epoch 1, ...")
    assert err.getvalue().startswith("loading … done in ")
    assert "epoch 1/3: 100%" in err.getvalue()
    assert out.getvalue() == "Epoch 1, ...\n"
    quiet_out, quiet_err = io.StringIO(), io.StringIO()
    quiet = Console(progress=False, out=quiet_out, err=quiet_err)
    with quiet.phase("loading"):
        quiet.say("result")
    assert quiet_err.getvalue() == "" and quiet_out.getvalue() == "result\n"
    with pytest.raises(RuntimeError), console.phase("failing"):
        raise RuntimeError
    assert err.getvalue().rstrip().endswith("failing … failed")
    assert SILENT.bar([1], "x") == [1]
