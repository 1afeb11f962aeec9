"""The command line: ``symgrad demo``, ``--version``, ``derive``,
``cache``."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import symgrad as sg
from symgrad import cli


def _console_script() -> list[str]:
    """The installed ``symgrad`` entry point (beside this interpreter), else ``-m symgrad``."""
    script = Path(sys.executable).with_name("symgrad")
    found = str(script) if script.exists() else shutil.which("symgrad")
    return [found] if found else [sys.executable, "-m", "symgrad"]


def test_demo_exits_zero_and_prints_the_agreement_line():
    out = subprocess.run([*_console_script(), "demo", "--size", "200"], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    line = re.search(r"largest relative difference from torch \(float64\): (\S+) — agrees",
                     out.stdout)
    assert line, out.stdout
    assert float(line.group(1)) <= 1e-10
    for name in sg.BUILTINS:  # one row per built-in
        assert re.search(rf"^{name}\s", out.stdout, re.MULTILINE), name


def test_python_m_symgrad_version():
    out = subprocess.run([sys.executable, "-m", "symgrad", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"symgrad {sg.__version__}"


def test_derive_prints_the_derivation_of_a_builtin(capsys):
    assert cli.main(["derive", "sigmoid"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == sg.builtin("sigmoid").derivation().to_text().strip()


def test_cache_path_is_the_environment_override(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SYMGRAD_CACHE_DIR", str(tmp_path / "k"))
    assert cli.main(["cache", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "k")


def test_no_command_is_a_usage_error():
    with pytest.raises(SystemExit) as err:
        cli.main([])
    assert err.value.code != 0

