"""Derivation printouts: symgrad.explain, ``symgrad derive`` and docs/derivations.

What is checked, each against something computed independently of the printout:

* every LaTeX equation — of ``to_latex()`` for every built-in and network, and of every
  Markdown page — is typeset by a real math renderer, matplotlib's mathtext (which refuses
  unknown commands, ``cases`` environments and unbalanced braces);
* the printed compiled expression of every derivation, parsed back from the text printout,
  equals the op's ``derivation().partials[k].final`` (and ``stable_forward``);
* a network printout's forward definitions and vector-Jacobian products, evaluated number by
  number from the printed expressions, give torch autograd's gradients;
* the article's §4.2 factors and product equal ``sympy.diff`` of the article's formulas;
* docs/derivations is what the generator writes today.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sympy as sp
import torch
from matplotlib import mathtext

import symgrad as sg
from symgrad import explain, nn
from symgrad.cli import main
from symgrad.errors import DefinitionError, ExplainError
from symgrad.symbolic.derive import Derivation
from symgrad.symbolic.functions import sigmoid, softplus
from symgrad.symbolic.index import IndexSum, ReduceMax, TensorDerivation
from symgrad.symbolic.parse import parse_formula

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "derivations"
ELEMENTWISE = list(sg.BUILTINS)
TENSOR = list(sg.TENSOR_BUILTINS)


@pytest.fixture(scope="module")
def derivations() -> dict[str, Any]:
    """Every built-in's derivation, from the compiled op, and the two network printouts."""
    out: dict[str, Any] = {name: sg.builtin(name).derivation() for name in ELEMENTWISE + TENSOR}
    out["network:article"] = explain.article_derivation()
    out["network:finetune"] = explain.finetune_derivation()
    return out


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return explain.doc_pages()


# -- LaTeX: every equation through matplotlib's mathtext ----------------------------------

_MATHTEXT = mathtext.MathTextParser("path")  # full TeX layout, no rasterizing


def _latex_math(text: str) -> set[str]:
    """Display (``\\[ ... \\]``) and inline (``$...$``) math of a ``to_latex`` printout."""
    displays = re.findall(r"^\\\[\n(.*?)\n\\\]$", text, re.S | re.M)
    prose = re.sub(r"^\\\[\n.*?\n\\\]$", "", text, flags=re.S | re.M)
    prose = re.sub(r"\\begin\{verbatim\}.*?\\end\{verbatim\}", "", prose, flags=re.S)
    prose = prose.replace(r"\$", "")
    inline = re.findall(r"\$(.+?)\$", prose)
    assert prose.count("$") == 2 * len(inline), "unbalanced $ in LaTeX prose"
    return {*displays, *inline}


def _markdown_math(text: str) -> set[str]:
    """Display (``$$``) and inline (``$...$``) math of a Markdown printout."""
    displays = re.findall(r"^\$\$\n(.*?)\n\$\$$", text, re.S | re.M)
    prose = re.sub(r"^\$\$\n.*?\n\$\$$", "", text, flags=re.S | re.M)
    prose = re.sub(r"^```.*?^```$", "", prose, flags=re.S | re.M)
    prose = prose.replace(r"\$", "")
    inline = re.findall(r"\$(.+?)\$", prose)
    assert prose.count("$") == 2 * len(inline), "unbalanced $ in Markdown prose"
    return {*displays, *inline}


def _typeset(equation: str) -> str | None:
    """None if mathtext typesets ``equation``, else its error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _MATHTEXT.parse(f"${equation}$", dpi=72)
    except ValueError as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def test_mathtext_is_a_strict_check() -> None:
    # What the printer must avoid is refused, so an accepted equation means something.
    for bad in (r"\begin{cases} a & b \end{cases}", r"\frac{a}{", r"\textrm{a}", r"x^{", r"\&"):
        assert _typeset(bad) is not None, bad
    assert _typeset(r"\left\lbrace x \ \text{if}\ x > 0 \right.") is None


def test_every_latex_equation_is_typeset_by_mathtext(
    derivations: dict[str, Any], pages: dict[str, str]
) -> None:
    equations: set[str] = set()
    for name, d in derivations.items():
        tex = explain.to_latex(d)
        assert tex.isascii(), f"{name}: LaTeX output must be ASCII (no unicode-math needed)"
        assert tex.count(r"\[") == tex.count(r"\]")
        found = _latex_math(tex)
        assert found, name
        equations |= found
    for page in pages.values():
        equations |= _markdown_math(page)
    failures = {eq[:120]: err for eq in sorted(equations) if (err := _typeset(eq)) is not None}
    assert not failures, failures
    assert len(equations) > 300  # every op, every step: hundreds of distinct equations


def test_article_equations_rasterize(pages: dict[str, str]) -> None:
    for eq in sorted(_markdown_math(pages["article_bce.md"])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mathtext.math_to_image(f"${eq}$", io.BytesIO(), format="png", dpi=50)


# -- the printed result is the compiled expression -----------------------------------------


def _compiled_lines(text: str) -> list[tuple[str, str]]:
    """``(lhs, rhs)`` of every ``compiled`` line of a text printout."""
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("compiled"):
            lhs, rhs = stripped.split(": ", 1)[1].split(" = ", 1)
            out.append((lhs, rhs))
    return out


def _rationalize(expr: sp.Basic) -> sp.Basic:
    return expr.xreplace({f: sp.Rational(repr(float(f))) for f in expr.atoms(sp.Float)})


def _same(got: sp.Basic, want: sp.Basic) -> bool:
    """Equal, or equal once re-parsing's automatic distribution (``(a + b)/2``) is undone."""
    if got == want:
        return True
    got, want = _rationalize(got), _rationalize(want)
    return got == want or sp.expand(got - want) == 0


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_printout_shows_the_compiled_expressions(name: str) -> None:
    d = sg.builtin(name).derivation()
    assert isinstance(d, Derivation)
    lines = _compiled_lines(d.to_text())
    expected = [d.stable_forward, *(p.final for p in d.partials)]
    assert len(lines) == len(expected)
    for (_, rhs), want in zip(lines, expected, strict=True):
        got = parse_formula(rhs)  # the printout parsed back, by symgrad's own safe parser
        assert _same(got, want), (rhs, want)
    markdown, latex = d.to_markdown(), d.to_latex()
    for p in d.partials:
        assert f"= {sp.sstr(p.final)}\n```" in markdown
        assert explain.latex(p.final) in latex


def _parse_trusted(text: str, like: sp.Basic) -> sp.Basic:
    """Parse our own printout (trusted text) with SymPy, naming tensors and indices as ``like``."""
    names: dict[str, Any] = {s.name: s for s in like.atoms(sp.Symbol)}
    names.update({str(b.label): b for b in like.atoms(sp.IndexedBase)})
    names.update({"ReduceMax": ReduceMax, "sigmoid": sigmoid, "softplus": softplus})
    names["Sum"] = IndexSum  # index notation's sums print as Sum
    return sp.parse_expr(text, local_dict=names, global_dict=dict(vars(sp)))


@pytest.mark.parametrize("name", TENSOR)
def test_tensor_printout_shows_the_compiled_expressions(name: str) -> None:
    d = sg.builtin(name).derivation()
    assert isinstance(d, TensorDerivation)
    lines = _compiled_lines(d.to_text())
    expected = [d.stable_forward, *(p.final for p in d.partials)]
    assert len(lines) == len(expected)
    for (lhs, rhs), want in zip(lines, expected, strict=True):
        got = _parse_trusted(rhs, want)
        assert _same(got, want), (lhs, rhs)
    for p in d.partials:
        assert explain.latex(p.final) in d.to_latex()
        assert f"= {sp.sstr(p.final)}\n```" in d.to_markdown()


def test_printout_shows_each_step_of_the_contraction() -> None:
    d = sg.builtin("linear").derivation()
    text = d.to_text()
    section = text.split("\ngrad_W[")[1].split("\ngrad_c[")[0]
    raw = section.split("chain rule: ")[1].split("\n")[0]
    assert raw.count("KroneckerDelta") == 2
    assert "KroneckerDelta" not in section.split("contracted: ")[1]
    assert "2 deltas under 2 sums before, 0 deltas and 1 sum after" in section


def test_printout_shows_every_stability_rewrite() -> None:
    def flat(text: str) -> str:  # the text printout wraps long items
        return " ".join(text.split())

    d = sg.builtin("bce_with_logits").derivation()
    text = flat(d.to_text())
    for rw in d.forward_rewrites:
        assert flat(f"{rw.rule}: {sp.sstr(rw.before)} → {sp.sstr(rw.after)} — {rw.why}") in text
    sigmoid_d = sg.builtin("sigmoid").derivation()
    (rw,) = sigmoid_d.partials[0].rewrites
    assert flat(f"{rw.rule}: {sp.sstr(rw.before)} → {sp.sstr(rw.after)}") in flat(
        sigmoid_d.to_text()
    )
    assert explain.latex(rw.after) in sigmoid_d.to_markdown()


def test_cse_summary_counts_what_the_kernel_computes() -> None:
    d = sg.builtin("bce_with_logits").derivation()
    summary = explain.cse_summary([d.stable_forward, *d.gradients])
    # rebuilding the expressions from the temporaries gives the lowered originals back
    for result, original in zip(summary.results, [d.stable_forward, *d.gradients], strict=True):
        rebuilt = result
        for sym, value in reversed(summary.temporaries):
            rebuilt = rebuilt.xreplace({sym: value})
        assert rebuilt == explain.lower_primitives(original)
    assert summary.ops_after < summary.ops_before
    text = d.to_text()
    assert f"{summary.ops_before} without CSE, {summary.ops_after} with CSE" in text
    assert "_t0 = exp(-Abs(x))" in text  # one exp(-|x|) shared by softplus and σ


def test_a_summation_index_never_leaves_its_sum() -> None:
    d = sg.builtin("layer_norm").derivation()
    summary = explain.cse_summary([d.stable_forward, *(p.final for p in d.partials)])
    bound = set(explain._bound_symbols([d.stable_forward, *(p.final for p in d.partials)]))
    for _, value in summary.temporaries:
        assert not (value.free_symbols & bound)


def test_methods_on_both_derivation_kinds() -> None:
    for name in ("softplus", "softmax"):
        d = sg.builtin(name).derivation()
        assert d.to_text() == explain.to_text(d) == str(d)
        assert d.to_latex() == explain.to_latex(d)
        assert d.to_markdown() == explain.to_markdown(d)


def test_printouts_are_deterministic_across_processes() -> None:
    code = (
        "import symgrad as sg; from symgrad import explain; "
        "print(explain.to_markdown(sg.builtin('softmax_cross_entropy').derivation())); "
        "print(explain.to_latex(sg.builtin('huber').derivation()))"
    )
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
            timeout=300,
        )  # fmt: skip
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1]
    here = explain.to_markdown(sg.builtin("softmax_cross_entropy").derivation())
    assert outputs[0].startswith(here)


def test_the_symbolic_stage_imports_neither_numba_nor_torch() -> None:
    code = (
        "import sys, symgrad.explain, symgrad.symbolic.parse; "
        "print(sorted(m for m in ('numba', 'torch') if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert run.stdout.strip() == "[]"


# -- networks: the printed expressions, evaluated, are torch's gradients -------------------


def _evaluate(
    expr: sp.Expr, arrays: dict[str, np.ndarray], batch: int, at: dict[sp.Symbol, int]
) -> float:
    """The number ``expr`` stands for, with tensors read from ``arrays`` by label."""
    expr = expr.xreplace({**at, sp.Symbol("B", integer=True, positive=True): batch})

    def reduce_max(node: ReduceMax) -> sp.Expr:
        ((var, lo, hi),) = node.limits
        return sp.Max(*(node.function.xreplace({var: v}) for v in range(int(lo), int(hi) + 1)))

    expr = expr.replace(lambda e: isinstance(e, ReduceMax), reduce_max)
    expr = expr.replace(  # σ and softplus by their definitions, which evaluate numerically
        lambda e: isinstance(e, (sigmoid, softplus)), lambda e: type(e).definition(e.args[0])
    ).doit()
    values = {
        a: arrays[str(a.base.label)][tuple(int(i) for i in a.indices)]
        for a in expr.atoms(sp.Indexed)
    }
    return float(expr.xreplace(values))


def _fill(lhs: sp.Indexed, expr: sp.Expr, arrays: dict[str, np.ndarray], batch: int) -> None:
    """``arrays[lhs.base] = expr`` at every index of ``lhs``'s shape."""
    shape = tuple(
        int(sp.sympify(n).xreplace({sp.Symbol("B", integer=True, positive=True): batch}))
        for n in lhs.base.shape
    )
    out = np.empty(shape)
    for index in itertools.product(*(range(n) for n in shape)):
        at = dict(zip(lhs.indices, index, strict=True))
        out[index] = _evaluate(expr, arrays, batch, at)
    arrays[str(lhs.base.label)] = out


def _run_printout(
    nd: explain.NetworkDerivation, arrays: dict[str, np.ndarray], batch: int
) -> dict[str, np.ndarray]:
    """Forward and backward by evaluating the printout's own expressions, in order."""
    arrays = dict(arrays)
    for layer in nd.layers:
        _fill(layer.element, layer.forward, arrays, batch)
    grad, seed = nd.loss.seed
    _fill(grad, seed, arrays, batch)
    for layer in reversed(nd.layers):
        for lhs, expr in layer.vjps:
            _fill(lhs, expr, arrays, batch)
    return arrays


def _params(nd: explain.NetworkDerivation, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        str(base.label): rng.normal(size=tuple(int(n) for n in base.shape))
        for layer in nd.layers
        for base, _ in layer.parameters
    }


def test_printed_mlp_with_cross_entropy_gives_torch_gradients() -> None:
    rng = np.random.default_rng(0)
    model = nn.Sequential(
        nn.Linear(3, 4, dtype=np.float64, rng=rng),
        nn.Tanh(),
        nn.Linear(4, 2, dtype=np.float64, rng=rng),
    )
    nd = explain.network_derivation(model, nn.CrossEntropyLoss())
    batch = 3
    arrays = _params(nd, rng)
    arrays["x"] = rng.normal(size=(batch, 3))
    labels = np.array([0, 1, 1])
    arrays["T"] = np.eye(2)[labels]
    got = _run_printout(nd, arrays, batch)

    t = {k: torch.tensor(arrays[k], requires_grad=True) for k in ("W_1", "c_1", "W_2", "c_2")}
    x = torch.tensor(arrays["x"])
    z2 = torch.tanh(x @ t["W_1"].T + t["c_1"]) @ t["W_2"].T + t["c_2"]
    torch.nn.functional.cross_entropy(z2, torch.tensor(labels)).backward()
    for name, tensor in t.items():
        assert tensor.grad is not None
        np.testing.assert_allclose(got[f"grad_{name}"], tensor.grad.numpy(), rtol=1e-12, atol=1e-14)
    assert [str(p.label) for p, _ in nd.chains] == ["W_1", "c_1", "W_2", "c_2"]


def test_printed_fused_sigmoid_bce_gives_torch_gradients() -> None:
    rng = np.random.default_rng(1)
    model = nn.Sequential(nn.Linear(2, 2, dtype=np.float64, rng=rng), nn.Sigmoid())
    nd = explain.network_derivation(model, nn.BCELoss())
    assert nd.fusion is not None and nd.fusion.fused == "sigmoid_bce"
    batch = 3
    arrays = _params(nd, rng)
    arrays["x"] = rng.normal(size=(batch, 2))
    arrays["y"] = rng.uniform(size=(batch, 2))
    got = _run_printout(nd, arrays, batch)

    t = {k: torch.tensor(arrays[k], requires_grad=True) for k in ("W_1", "c_1")}
    p = torch.sigmoid(torch.tensor(arrays["x"]) @ t["W_1"].T + t["c_1"])
    torch.nn.functional.binary_cross_entropy(p, torch.tensor(arrays["y"])).backward()
    for name, tensor in t.items():
        assert tensor.grad is not None
        np.testing.assert_allclose(got[f"grad_{name}"], tensor.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_layer_norm_and_bias_free_linear_printouts_give_torch_gradients() -> None:
    rng = np.random.default_rng(2)
    model = nn.Sequential(
        nn.Linear(3, 3, bias=False, dtype=np.float64, rng=rng),
        nn.LayerNorm(3, dtype=np.float64),
        nn.Linear(3, 2, dtype=np.float64, rng=rng),
    )
    nd = explain.network_derivation(model, nn.MSELoss())
    batch = 2
    arrays = _params(nd, rng)
    arrays["x"] = rng.normal(size=(batch, 3))
    arrays["y"] = rng.normal(size=(batch, 2))
    got = _run_printout(nd, arrays, batch)

    names = ("W_1", "gamma_2", "beta_2", "W_3", "c_3")
    t = {k: torch.tensor(arrays[k], requires_grad=True) for k in names}
    h = torch.tensor(arrays["x"]) @ t["W_1"].T
    u = torch.nn.functional.layer_norm(h, (3,), t["gamma_2"], t["beta_2"], eps=1e-5)
    z = u @ t["W_3"].T + t["c_3"]
    torch.nn.functional.mse_loss(z, torch.tensor(arrays["y"])).backward()
    for name, tensor in t.items():
        assert tensor.grad is not None
        np.testing.assert_allclose(got[f"grad_{name}"], tensor.grad.numpy(), rtol=1e-10, atol=1e-13)


def test_finetune_network_printout() -> None:
    nd = explain.finetune_derivation()
    assert [layer.op for layer in nd.layers] == ["linear", "tanh", "linear", "tanh", "linear"]
    assert nd.loss.op == "softmax_cross_entropy" and nd.fusion is None
    chains = {str(p.label): [m.text for m in pieces] for p, pieces in nd.chains}
    assert set(chains) == {"W_1", "c_1", "W_2", "c_2", "W_3", "c_3"}
    assert " ".join(chains["W_1"]) == (
        "∂L/∂W_1 = ∂L/∂z_3 · ∂z_3/∂h_2 · ∂h_2/∂z_2 · ∂z_2/∂h_1 · ∂h_1/∂z_1 · ∂z_1/∂W_1"
    )
    text = nd.to_text()
    for state in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"):
        assert state in text
    tanh_final = sg.builtin("tanh").derivation().partials[0].final
    z2 = sp.IndexedBase("z_2")[sp.symbols("b i", integer=True)]
    assert sp.sstr(tanh_final.xreplace({sp.Symbol("x", real=True): z2})) in text


def test_network_errors_name_what_is_unsupported() -> None:
    class Custom(nn.Module):
        pass

    with pytest.raises(ExplainError, match="Custom"):
        explain.network_derivation(nn.Sequential(Custom()), nn.MSELoss())
    with pytest.raises(ExplainError, match="Sequential"):
        explain.network_derivation(nn.Tanh(), nn.MSELoss())  # type: ignore[arg-type]


# -- the article's §4.2 ----------------------------------------------------------------------


def test_article_factors_and_product_are_sympys_derivatives(pages: dict[str, str]) -> None:
    nd = explain.article_derivation()
    f = nd.fusion
    assert f is not None and f.agrees
    p, y, z = f.p, f.y, f.z
    loss = -y * sp.log(p) - (1 - y) * sp.log(1 - p)  # the article's L, as written there
    prob = 1 / (1 + sp.exp(-z))  # σ(z), as written there
    # ∂L/∂p: the printed local factor (both forms) is sympy.diff of the article's loss
    assert sp.simplify(f.loss_factor_raw - sp.diff(loss, p)) == 0
    assert sp.simplify(f.loss_factor - sp.diff(loss, p)) == 0
    # ∂p/∂z: the printed factor, in p and in z, is sympy.diff of σ
    dp_dz = sp.diff(prob, z)
    assert sp.simplify(f.activation_factor_p.subs(p, prob) - dp_dz) == 0
    assert sp.simplify(f.activation_factor.rewrite(sp.exp) - dp_dz) == 0
    assert f.activation_factor_p.free_symbols == {p}  # written with p alone
    # the product, simplified, is ∂L/∂z of the composition
    dl_dz = sp.diff(loss.subs(p, prob), z)
    assert sp.simplify(f.product.subs(p, prob) - dl_dz) == 0
    assert sp.simplify(f.product_z.rewrite(sp.exp) - dl_dz) == 0
    assert f.product.free_symbols == {p, y} and sp.Poly(f.product, p, y).total_degree() == 1
    # ... and is what the fused op compiled
    assert f.product_z == f.fused_final
    page = pages["article_bce.md"]
    for expr in (f.loss_factor_raw, f.activation_factor_p, f.product, f.fused_final):
        assert explain.latex(expr) in page
    assert "p - y" in nd.to_text()


def test_article_printout_gives_torch_gradients() -> None:
    nd = explain.article_derivation()
    rng = np.random.default_rng(3)
    batch = 5
    arrays = _params(nd, rng)
    arrays["x"] = rng.normal(size=(batch, 3))
    arrays["y"] = rng.integers(0, 2, size=(batch, 1)).astype(float)
    got = _run_printout(nd, arrays, batch)
    t = {k: torch.tensor(arrays[k], requires_grad=True) for k in ("W_1", "c_1")}
    prob = torch.sigmoid(torch.tensor(arrays["x"]) @ t["W_1"].T + t["c_1"])
    torch.nn.functional.binary_cross_entropy(prob, torch.tensor(arrays["y"])).backward()
    for name, tensor in t.items():
        assert tensor.grad is not None
        np.testing.assert_allclose(got[f"grad_{name}"], tensor.grad.numpy(), rtol=1e-12)


# -- docs/derivations ----------------------------------------------------------------------


def test_docs_are_up_to_date(pages: dict[str, str]) -> None:
    stale = [
        n
        for n, text in pages.items()
        if not (DOCS / n).exists() or (DOCS / n).read_text(encoding="utf-8") != text
    ]
    extra = sorted(p.name for p in DOCS.glob("*.md") if p.name not in pages)
    assert not stale and not extra, (
        f"docs/derivations is out of date (stale: {stale}, not generated: {extra}); "
        "run: python -m symgrad.explain --write docs/derivations"
    )


def test_docs_cover_every_builtin_and_the_index_links_them(pages: dict[str, str]) -> None:
    index = pages["README.md"]
    for name in [*ELEMENTWISE, *TENSOR, "finetune_mlp", "article_bce"]:
        assert f"{name}.md" in pages
        assert f"]({name}.md)" in index
    linked = set(re.findall(r"\]\(([^)]+\.md)\)", index))
    assert linked == set(pages) - {"README.md"}


def test_write_and_check_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(explain, "doc_pages", lambda: {"a.md": "# a\n", "README.md": "[a](a.md)\n"})
    assert explain.main(["--check", str(tmp_path)]) == 1
    assert "out of date in" in capsys.readouterr().err
    assert explain.main(["--write", str(tmp_path)]) == 0
    assert (tmp_path / "a.md").read_text(encoding="utf-8") == "# a\n"
    assert explain.main(["--check", str(tmp_path)]) == 0
    (tmp_path / "a.md").write_text("# edited\n", encoding="utf-8")
    assert explain.stale_docs(tmp_path) == ["a.md"]


# -- the command line ------------------------------------------------------------------------


def test_derive_builtin_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["derive", "sigmoid"]) == 0
    out = capsys.readouterr().out
    assert out == sg.builtin("sigmoid").derivation().to_text()


def test_derive_formula_with_wrt(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["derive", "x*tanh(softplus(x))", "--wrt", "x"]) == 0
    out = capsys.readouterr().out
    x = sp.Symbol("x", real=True)
    op = sg.elementwise(x * sp.tanh(softplus(x)), inputs=[x], name="mish_check")
    ((lhs, rhs),) = _compiled_lines(out)[1:]
    assert lhs == "∂y/∂x" and parse_formula(rhs) == op.derivation().partials[0].final


def test_derive_formula_several_inputs_and_a_subset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["derive", "x*exp(y)", "--wrt", "x", "--wrt", "y"]) == 0
    lines = _compiled_lines(capsys.readouterr().out)
    assert [lhs for lhs, _ in lines] == ["f", "∂f/∂x", "∂f/∂y"]
    assert main(["derive", "x*exp(y)", "--wrt", "y"]) == 0
    lines = _compiled_lines(capsys.readouterr().out)
    assert [lhs for lhs, _ in lines] == ["f", "∂f/∂y"]
    assert parse_formula(lines[1][1]) == parse_formula("x*exp(y)")


def test_derive_formats_and_output_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = sg.builtin("layer_norm").derivation()
    target = tmp_path / "ln.md"
    assert (
        main(
            ["derive", "layer_norm", "--wrt", "w", "--format", "markdown", "--output", str(target)]
        )
        == 0
    )
    text = target.read_text(encoding="utf-8")
    assert "grad_w[k0_w] = " + sp.sstr(d.partials[1].final) in text
    assert "grad_X[" not in text  # only the asked-for input
    assert capsys.readouterr().out == f"wrote {target}\n"
    assert main(["derive", "softplus", "--format", "latex", "--param", "beta=2"]) == 0
    latex_out = capsys.readouterr().out
    assert latex_out.startswith(r"\section*{") and "beta = 2.0" in latex_out
    assert main(["derive", "softplus", "--format", "markdown"]) == 0
    assert capsys.readouterr().out == sg.builtin("softplus").derivation().to_markdown()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["derive", "sigmod"], "no built-in op 'sigmod'"),
        (["derive", "linear", "--wrt", "Q"], "no input(s) ['Q']"),
        (["derive", "x**2", "--wrt", "z"], "no symbol 'z'"),
        (["derive", "x**2", "--param", "a"], "NAME=NUMBER"),
        (["derive", "x.real"], "attribute access"),
        (["derive", "x[0]"], "subscript"),
    ],
)
def test_derive_errors_are_clean(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_derivation_for_rejects_unknown_constant() -> None:
    with pytest.raises(DefinitionError, match="do not occur"):
        explain.derivation_for("x**2", params={"a": 1.0})
