"""The on-disk kernel cache: named by hash, deterministic, verified, rebuilt when corrupt, safe
under concurrent compiles, and a warm start that skips derivation.

Every test uses its own empty cache directory (``SYMGRAD_CACHE_DIR`` is read on every call) and
an empty in-process op table (``symgrad.api._OPS``), so nothing leaks between tests.  Tests
that need a fresh interpreter (Numba's binaries are loaded once per process) use subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch

import symgrad as sg
import symgrad.api
from symgrad.runtime import cache

x = sp.Symbol("x", real=True)

#: The op the subprocesses build: softplus(x)·tanh(x), written naively.
SUB_FORMULA = "sp.log(1 + sp.exp(x)) * sp.tanh(x)"
SUB_SCRIPT = textwrap.dedent(
    f"""
    import json, sys, time
    import numpy as np, sympy as sp
    import symgrad as sg
    import symgrad.api

    if len(sys.argv) > 1 and sys.argv[1] == "forbid-derivation":
        def forbidden(spec):
            raise AssertionError("derivation ran on a warm start")
        symgrad.api.derive_elementwise = forbidden
    if len(sys.argv) > 2:  # start together with the other processes
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    x = sp.Symbol("x", real=True)
    op = sg.elementwise({SUB_FORMULA}, inputs=[x], name="cache_sub")
    derived_at_definition = op._derivation is not None
    a = np.linspace(-6.0, 6.0, 25)
    value, (grad,) = op.value_and_vjp(a, grad_output=np.ones_like(a))
    total, (grad_sum,) = op.value_and_vjp(a, reduction="sum")
    print(json.dumps({{
        "forward": op(a).tolist(), "vjp": op.vjp(a, np.ones_like(a))[0].tolist(),
        "value": value.tolist(), "grad": grad.tolist(), "total": float(total),
        "grad_sum": grad_sum.tolist(), "source": op.source,
        "derived_at_definition": derived_at_definition,
    }}))
    """
)


@pytest.fixture
def cache_dir(monkeypatch, tmp_path) -> Path:
    path = tmp_path / "kernels"
    monkeypatch.setenv("SYMGRAD_CACHE_DIR", str(path))
    monkeypatch.setattr(symgrad.api, "_OPS", {})
    return path


def run_sub(cache_path: Path, *args: str, hash_seed: str = "0") -> dict:
    env = {**os.environ, "SYMGRAD_CACHE_DIR": str(cache_path), "PYTHONHASHSEED": hash_seed}
    out = subprocess.run([sys.executable, "-c", SUB_SCRIPT, *args], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def sub_reference() -> dict[str, np.ndarray]:
    """softplus(x)·tanh(x) and its derivative at the subprocesses' points, by torch autograd."""
    a = torch.linspace(-6.0, 6.0, 25, dtype=torch.float64, requires_grad=True)
    value = torch.log1p(torch.exp(a)) * torch.tanh(a)
    value.sum().backward()
    return {"value": value.detach().numpy(), "grad": a.grad.numpy()}


def check_sub_results(result: dict) -> None:
    ref = sub_reference()
    for key in ("forward", "value"):
        np.testing.assert_allclose(result[key], ref["value"], rtol=1e-10, atol=1e-12, err_msg=key)
    for key in ("vjp", "grad", "grad_sum"):
        np.testing.assert_allclose(result[key], ref["grad"], rtol=1e-10, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(result["total"], ref["value"].sum(), rtol=1e-12)


@pytest.fixture(scope="module")
def warm_template(tmp_path_factory) -> tuple[Path, dict]:
    """A cache directory filled by one cold subprocess, and that process's results.

    Tests copy it (modification times kept: Numba's index checks them) instead of paying for
    a cold compile each.
    """
    path = tmp_path_factory.mktemp("warm") / "kernels"
    result = run_sub(path)
    check_sub_results(result)
    assert result["derived_at_definition"]
    return path, result


def copy_of(template: Path, tmp_path: Path) -> Path:
    target = tmp_path / "kernels"
    shutil.copytree(template, target)
    return target


def numba_files(cache_path: Path) -> list[Path]:
    return sorted((cache_path / "__pycache__").glob("cache_sub_*.nb[ic]"))


def make_op(name: str = "cache_probe", **flags) -> sg.api.ElementwiseOp:
    return sg.elementwise(x * sp.exp(-x) + sp.sin(x), inputs=[x], name=name, **flags)


def probe_reference(a: np.ndarray) -> np.ndarray:
    return a * np.exp(-a) + np.sin(a)


# -- files ------------------------------------------------------------------------------------


def test_source_written_named_by_hash_with_verified_header(cache_dir):
    op = make_op()
    files = list(cache_dir.glob("*.py"))
    assert len(files) == 1
    (path,) = files
    assert re.fullmatch(r"cache_probe_[0-9a-f]{24}\.py", path.name)
    text = path.read_text()
    assert op.source == text
    header = text.split("\n", 3)
    assert "'cache_probe'" in header[0]
    assert sg.__version__ in header[1] and op.spec.key in header[1]
    recorded = re.fullmatch(r"# body-sha256 ([0-9a-f]{64})", header[2]).group(1)
    assert recorded == hashlib.sha256(header[3].encode()).hexdigest()
    a = np.linspace(-3, 3, 13)
    np.testing.assert_allclose(op(a), probe_reference(a), rtol=1e-13)
    # another formula, another file
    sg.elementwise(x * sp.exp(-2 * x), inputs=[x], name="cache_probe")
    assert len(list(cache_dir.glob("cache_probe_*.py"))) == 2


def test_toolchain_change_names_a_new_file(cache_dir, monkeypatch):
    """A kernel from another symgrad/Numba/SymPy build is never picked up: its name differs."""
    op = make_op()
    before = cache.module_path(op.name, op.spec.key)
    monkeypatch.setattr(cache, "toolchain_fingerprint", lambda: "another toolchain")
    after = cache.module_path(op.name, op.spec.key)
    assert before.parent == after.parent == cache_dir and before.name != after.name


def test_source_is_deterministic(cache_dir):
    first = make_op().source
    for file in cache_dir.glob("*.py"):
        file.unlink()
    symgrad.api._OPS.clear()
    second = make_op().source
    assert first == second


def test_source_is_deterministic_across_processes(tmp_path, warm_template):
    """Same op, two interpreters with different hash seeds (set iteration order), two cache
    directories: byte-identical source."""
    _, first = warm_template
    assert run_sub(tmp_path, hash_seed="12345")["source"] == first["source"]


# -- corruption -------------------------------------------------------------------------------


def _truncate(text: str) -> str:
    return text[: len(text) // 2]


def _tamper(text: str) -> str:
    """Valid Python whose forward doubles its result; only the hash can tell."""
    assert "out[i] = " in text
    return text.replace("out[i] = ", "out[i] = 2.0 * ", 1)


CORRUPTIONS = {
    "truncated": _truncate,
    "tampered": _tamper,
    "empty": lambda text: "",
    "no-header": lambda text: text.split("\n", 3)[3],
    "binary": lambda text: "\udcff\x00garbage",
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_corrupt_source_is_rebuilt(cache_dir, corrupt):
    original = make_op().source
    (path,) = cache_dir.glob("*.py")
    path.write_bytes(CORRUPTIONS[corrupt](original).encode("utf-8", "surrogateescape"))
    assert cache.verified_text(path) is None
    symgrad.api._OPS.clear()
    op = make_op()
    assert op._derivation is not None  # derived again, not loaded
    assert path.read_text() == original and op.source == original
    a = np.linspace(-3, 3, 13)
    np.testing.assert_allclose(op(a), probe_reference(a), rtol=1e-13)


@pytest.mark.parametrize(("suffixes", "damage"), [((".nbi",), "garbage"), ((".nbc",), "truncated"),
                                                  ((".nbi", ".nbc"), "truncated"),
                                                  ((".nbc",), "garbage")])
def test_corrupt_numba_cache_file_then_op_works_in_a_fresh_process(tmp_path, warm_template,
                                                                   suffixes, damage):
    template, first = warm_template
    path = copy_of(template, tmp_path)
    damaged = [f for f in numba_files(path) if f.suffix in suffixes]
    assert {f.suffix for f in damaged} == set(suffixes), list((path / "__pycache__").iterdir())
    for f in damaged:
        data = f.read_bytes()
        f.write_bytes(b"\x80\x04garbage" * 7 if damage == "garbage" else data[: len(data) // 3])
    second = run_sub(path)
    check_sub_results(second)
    assert second["forward"] == first["forward"] and second["grad"] == first["grad"]


def test_two_processes_compiling_the_same_op_at_once_both_succeed(tmp_path):
    env = {**os.environ, "SYMGRAD_CACHE_DIR": str(tmp_path)}
    start_at = str(time.time() + 6.0)  # after both have imported symgrad
    procs = [
        subprocess.Popen([sys.executable, "-c", SUB_SCRIPT, "-", start_at], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    for result in results:
        check_sub_results(result)
    assert results[0]["source"] == results[1]["source"]
    assert len(list(tmp_path.glob("cache_sub_*.py"))) == 1
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    # and the result is a valid warm cache
    assert cache.verified_text(next(tmp_path.glob("cache_sub_*.py"))) is not None


# -- warm start -------------------------------------------------------------------------------


def test_warm_start_in_a_fresh_process_skips_derivation(tmp_path, warm_template):
    template, cold = warm_template
    warm = run_sub(copy_of(template, tmp_path), "forbid-derivation")  # derivation would raise
    assert not warm["derived_at_definition"]
    for key in ("forward", "vjp", "value", "grad", "total", "grad_sum", "source"):
        assert warm[key] == cold[key], key
    check_sub_results(warm)


def test_warm_start_in_process_derives_lazily(cache_dir):
    cold = make_op()
    assert cold._derivation is not None
    symgrad.api._OPS.clear()
    warm = make_op()
    assert warm is not cold and warm._derivation is None
    a = np.linspace(-2, 2, 9)
    np.testing.assert_array_equal(warm(a), cold(a))
    np.testing.assert_array_equal(warm.vjp(a, np.ones(9))[0], cold.vjp(a, np.ones(9))[0])
    derivation = warm.derivation()
    assert warm._derivation is derivation
    assert derivation.gradients == cold.derivation().gradients


def test_same_definition_returns_the_same_op(cache_dir):
    assert make_op() is make_op()


# -- compile options --------------------------------------------------------------------------


def test_fastmath_and_parallel_have_their_own_files_and_correct_results(cache_dir):
    plain, fast, par = make_op(), make_op(fastmath=True), make_op(parallel=True)
    paths = {p.name for p in cache_dir.glob("cache_probe_*.py")}
    assert len(paths) == 3
    assert "fastmath=True" in fast.source and "fastmath=True" not in plain.source
    assert "prange" in par.source and "parallel=True" in par.source
    # the plain op's own kernels are serial; only their `_par` variants are parallel
    assert "parallel=True)\ndef forward(" not in plain.source
    assert "parallel=True)\ndef forward(" in par.source
    assert "parallel=True)\ndef forward_par(" in plain.source
    rng = np.random.default_rng(0)
    a = rng.uniform(-3, 3, 150_000)  # more than one parallel chunk
    g = rng.normal(size=a.size)
    reference = probe_reference(a)
    leaf = torch.tensor(a, requires_grad=True)
    (leaf * torch.exp(-leaf) + torch.sin(leaf)).backward(torch.tensor(g))
    for op in (plain, fast, par):
        value, (grad,) = op.value_and_vjp(a, grad_output=g)
        # fast-math may reassociate: a few ulp, far inside 1e-10
        np.testing.assert_allclose(value, reference, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(grad, leaf.grad.numpy(), rtol=1e-10, atol=1e-12)
    # without fast-math, the parallel loop computes every element exactly as the serial one
    np.testing.assert_array_equal(par(a), plain(a))
    np.testing.assert_array_equal(par.vjp(a, g)[0], plain.vjp(a, g)[0])
    (total_par, _), (total_plain, _) = (op.value_and_vjp(a, reduction="sum") for op in (par, plain))
    np.testing.assert_allclose(float(total_par), float(total_plain), rtol=1e-12,
                               atol=1e-13 * np.abs(reference).sum())


def test_clear_cache(cache_dir):
    make_op()
    assert cache.clear_cache() == 1
    assert not list(cache_dir.glob("*.py"))
    symgrad.api._OPS.clear()
    op = make_op()
    a = np.linspace(-1, 1, 5)
    np.testing.assert_allclose(op(a), probe_reference(a), rtol=1e-13)
