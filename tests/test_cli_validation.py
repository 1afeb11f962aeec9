"""Bad command lines: every argument and every output path is checked before any work starts.

Each case must exit with status 2 and one line on stderr (no traceback), write nothing, and
never reach the work itself — the functions that would do the work are replaced by ones that
fail the test if called.  One case also runs as a real process (the console script), to see
the exit code, stderr and the time as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from symgrad import cli
from symgrad.errors import closest, did_you_mean


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Work functions that fail if called; the current directory an empty temporary one."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the work started before the arguments were checked")

    from symgrad import bench, explain
    from symgrad.tasks import finetune, minilm

    monkeypatch.setattr(minilm, "run", forbidden)
    monkeypatch.setattr(finetune, "run", forbidden)
    monkeypatch.setattr(finetune, "run_study", forbidden)
    monkeypatch.setattr(bench, "run", forbidden)
    monkeypatch.setattr(explain, "derivation_for", forbidden)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _rejects(argv: list[str], capsys: pytest.CaptureFixture[str], where: Path) -> str:
    """``argv`` exits 2 with one line on stderr, no traceback, nothing written; the line."""
    before = _tree(where.parent)
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own exit
        code = exit_.code  # type: ignore[assignment]
    captured = capsys.readouterr()
    assert code == 2, (argv, captured)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert lines[0].startswith("symgrad")
    assert _tree(where.parent) == before, "something was written"
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["finetune", "--epochs", "0"], "--epochs: must be ≥ 1, got 0"),
        (["finetune", "--epochs", "-1"], "--epochs: must be ≥ 1, got -1"),
        (["finetune", "--epochs", "-5", "--task", "digits"], "--epochs: must be ≥ 1, got -5"),
        (["finetune", "--task", "digits", "--pretrain-epochs", "0"], "--pretrain-epochs"),
        (["finetune", "--seed", "-1"], "--seed: must be ≥ 0, got -1"),
        (["finetune", "--lr", "0"], "--lr: must be a finite number > 0"),
        (["finetune", "--lr", "nan"], "--lr: must be a finite number > 0"),
        (["finetune", "--lr", "fast"], "--lr: expected a number"),
        (["finetune", "--task", "digits", "--lr", "0.1"], "--lr applies to --task sms-minilm"),
        (["finetune", "--limit", "0"], "--limit: must be ≥ 1"),
        (["finetune", "--limit", "-5"], "--limit: must be ≥ 1"),
        (["finetune", "--limit", "many"], "expected a whole number, got 'many'"),
        (["finetune", "--epochs", "2.5"], "expected a whole number, got '2.5'"),
        (["finetune", "--task", "digits", "--labels-per-class", "0"], "--labels-per-class"),
        (["finetune", "--task", "digits", "--seeds", "0"], "--seeds: must be ≥ 1"),
        (["finetune", "--task", "digits", "--labels-per-class", "500"], "fewer than 500"),
        (["finetune", "--task", "digits", "--level", "b"], "--level applies to --task sms-minilm"),
        (["finetune", "--limit", "5", "--task", "digits"], "--limit applies to --task sms-minilm"),
        (["finetune", "--freeze-body"], "--freeze-body applies to --task digits"),
        (["finetune", "--optimizer", "adam"], "--optimizer applies to --task digits"),
        (["finetune", "--task", "sms"], "did you mean 'sms-minilm'?"),
        (["finetune", "--epohcs", "3"], "did you mean '--epochs'?"),
        (["fintune"], "did you mean 'finetune'?"),
        (["demo", "--size", "0"], "--size: must be ≥ 1"),
        (["bench", "--threads", "0"], "--threads: must be ≥ 1"),
        (["derive", "x*y", "--format", "latx"], "did you mean 'latex'?"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(argv, says, capsys, no_work):
    assert says in _rejects(argv, capsys, no_work)


@pytest.mark.parametrize(
    "place",
    [
        "a_file/sub",  # under a regular file
        "a_file",  # --out is a file / --json is fine (a file) -> only used for --out
        "/proc/symgrad-test/out",  # a file system that takes no new files
    ],
)
def test_unwritable_out_exits_2_before_any_work(place, capsys, no_work):
    (no_work / "a_file").write_text("keep me")
    for argv in (
        ["finetune", "--out", place],
        ["finetune", "--task", "digits", "--out", place],
    ):
        line = _rejects(argv, capsys, no_work)
        assert "--out" in line and place.split("/")[0] in line
    assert (no_work / "a_file").read_text() == "keep me"


@pytest.mark.parametrize(
    ("option", "command"),
    [
        ("--json", ["finetune"]),
        ("--json", ["finetune", "--task", "digits"]),
        ("--output", ["derive", "sigmoid"]),
        ("--json", ["bench", "--quick"]),
        ("--markdown", ["bench", "--quick"]),
    ],
)
def test_unwritable_files_exit_2_before_any_work(option, command, capsys, no_work):
    (no_work / "a_file").write_text("keep me")
    (no_work / "a_dir").mkdir()
    for place in ("a_dir", "a_file/report.json", "/proc/symgrad-test.json", "/proc/x/y.json"):
        line = _rejects([*command, option, place], capsys, no_work)
        assert option in line and place in line
    assert (no_work / "a_file").read_text() == "keep me"


def test_a_writable_out_passes_the_check(tmp_path):
    assert cli.check_output_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert cli.check_output_file(tmp_path / "r.json", "--json") == tmp_path / "r.json"
    assert list(tmp_path.iterdir()) == []  # the checks leave nothing behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_directory_is_refused(tmp_path, capsys, no_work):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "not writable" in _rejects(
            ["finetune", "--out", str(locked / "out")], capsys, no_work
        )
    finally:
        locked.chmod(0o700)


def test_a_formula_may_start_with_a_minus(capsys):
    for argv in (
        ["derive", "-x**2", "--wrt", "x"],
        ["derive", "--wrt", "x", "-x**2"],
        ["derive", "--format", "text", "-x**2"],
    ):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "∂y/∂x = -2*x" in out, argv


def test_decimals_are_derived_exactly(capsys):
    assert cli.main(["derive", "x*0.5 + 0.25*x**2", "--wrt", "x"]) == 0
    out = capsys.readouterr().out
    assert "∂y/∂x = (x + 1)/2" in out  # d/dx (x/2 + x²/4), exactly
    assert "0.5000" not in out and "0.2500" not in out


def test_misspelt_names_get_a_suggestion(capsys):
    import symgrad as sg
    from symgrad.errors import DefinitionError

    with pytest.raises(DefinitionError, match="did you mean 'sigmoid'"):
        sg.builtin("sigmiod")
    with pytest.raises(DefinitionError, match="did you mean 'softplus'"):
        sg.builtin("sofplus")
    assert cli.main(["derive", "sigmiod"]) == 2
    assert "did you mean 'sigmoid'?" in capsys.readouterr().err
    assert cli.main(["derive", "tahn(x)"]) == 2
    assert "did you mean 'tanh'?" in capsys.readouterr().err


def test_closest():
    assert closest("sigmiod", ["sigmoid", "softplus"]) == "sigmoid"
    assert closest("sms", ["sms-minilm", "digits"]) == "sms-minilm"  # the only one it starts
    assert closest("zzz", ["sigmoid", "tanh"]) is None
    assert did_you_mean("zzz", ["sigmoid"]) == ""


def test_help_texts(capsys):
    for argv in (["--help"], ["finetune", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        if argv == ["--help"]:
            finetune_help = " ".join(out[out.index("finetune") : out.index("demo")].split())
            assert "MiniLM" in finetune_help and "SMS spam" in finetune_help
            for command in ("finetune", "demo", "derive", "bench", "cache"):
                assert command in out
        elif argv[0] == "finetune":
            from symgrad.tasks.finetune import FinetuneConfig
            from symgrad.tasks.minilm import MinilmConfig

            text = " ".join(out.split())
            assert "Adam, batch 16, 3 epochs" in text and "--lr 2e-5" in text
            assert f"(default {MinilmConfig().lr:g};" in text
            assert "runs/TASK" in text
            # the defaults the help states are the tasks' own
            assert f"default {MinilmConfig().limit} " in text
            assert f"(default {FinetuneConfig().labels_per_class})" in text
            assert f"(default {FinetuneConfig().pretrain_epochs})" in text
        else:
            description = out.split("\n\n")[1]
            assert "float64" in description and "torch" in description.lower()


def test_as_a_process_a_bad_argument_is_one_line_and_quick(tmp_path):
    """The console script, as a user runs it (the time is printed, not asserted: machines are
    shared; the work functions above prove nothing runs before the check)."""
    script = Path(sys.executable).with_name("symgrad")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "symgrad"]
    for args in (["finetune", "--epochs", "0"], ["finetune", "--out", "/proc/x"]):
        start = time.perf_counter()
        out = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        elapsed = time.perf_counter() - start
        print(f"{args}: exit {out.returncode} after {elapsed:.2f} s")
        assert out.returncode == 2, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
        assert out.stdout == ""
    assert list(tmp_path.iterdir()) == []
