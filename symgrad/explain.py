"""Derivation printouts: the chain rule step by step, as text, LaTeX and Markdown.

Everything printed is read off the derivation symgrad compiled — an op's
:class:`~symgrad.symbolic.derive.Derivation` or
:class:`~symgrad.symbolic.index.TensorDerivation`, or the ops of a network — never a template
with mathematics written in by hand:

* the forward formula, every stability rewrite applied to it (before → after, and why), and
  the stable forward the kernel evaluates;
* every local partial derivative: ``sympy.diff`` of the stable forward, canonicalized and
  simplified, rewritten, and the expression that is compiled;
* the chain-rule product for every input — ``grad_x = grad_y · ∂y/∂x`` for an elementwise op,
  ``grad_X[k] = Σ_out grad_Y[out] · ∂Y[out]/∂X[k]`` for an op in index notation, whose
  Kronecker deltas are then contracted (raw → contracted → compiled);
* the common subexpressions: ``sympy.cse`` of the compiled expressions after the stable
  primitives are lowered to their evaluate-by-sign forms (as the code generator does), and the
  operation counts (``sympy.count_ops``) without and with them.

A derivation becomes a :class:`Document` — headings, prose, display equations — and a document
renders three ways, so the printouts always agree: :func:`to_text` (unicode, for terminals;
expressions in SymPy's own syntax, so they can be pasted back), :func:`to_latex` (amsmath; its
equations also render with matplotlib's mathtext) and :func:`to_markdown` (GitHub-flavoured,
display math in ``$$``).  All three are deterministic.  :func:`network_derivation` does the same
for a ``Sequential`` and its loss: the chain-rule factors layer by layer, and the symbolic fusion
of a final activation into the loss.

This module imports neither numba nor torch.  ``python -m symgrad.explain --write
docs/derivations`` regenerates the derivation pages of the documentation.

>>> import sympy as sp
>>> from symgrad.symbolic.spec import elementwise_spec
>>> from symgrad.symbolic.derive import derive_elementwise
>>> x = sp.Symbol("x", real=True)
>>> d = derive_elementwise(elementwise_spec(x**3, [x], "cube"))
>>> print(to_text(d).splitlines()[0])
Derivation of cube(x)
>>> [line.strip() for line in to_text(d).splitlines() if "compiled" in line]
['compiled (stable forward): y = x**3', 'compiled: ∂y/∂x = 3*x**2']
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE

from .codegen.emit import lower_primitives  # SymPy only: the emitter imports no numba
from .errors import DefinitionError, ExplainError, did_you_mean
from .symbolic.derive import Derivation, Printouts, prepare
from .symbolic.index import ReduceMax, TensorDerivation, TensorPartial
from .symbolic.simplify import bounded_simplify
from .symbolic.stabilize import Rewrite, canonicalize, stabilize

if TYPE_CHECKING:
    from .nn.losses import Loss
    from .nn.modules import Module

# -- the document model --------------------------------------------------------------------


@dataclass(frozen=True)
class M:
    """A math fragment given in both forms: an operator, or a label such as ``∂y/∂x``."""

    text: str
    latex: str


@dataclass(frozen=True)
class Name:
    """An identifier in prose (code font in Markdown and LaTeX)."""

    text: str


#: A piece of a block: prose (``str``), an identifier, a math fragment or a SymPy expression
#: (inline math in prose).
Piece = Union[str, Name, M, sp.Basic]  # noqa: UP007 - a runtime alias, also for Python 3.11 mypy


@dataclass(frozen=True)
class Heading:
    level: int  # 1, 2 or 3
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Para:
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Items:
    items: tuple[tuple[Piece, ...], ...]


@dataclass(frozen=True)
class Equation:
    """A display equation; ``pieces`` are math fragments and expressions, joined by spaces."""

    label: str
    pieces: tuple[M | sp.Basic, ...]


@dataclass(frozen=True)
class Compiled:
    """``lhs = expr`` where ``expr`` is exactly what a kernel evaluates; also shown as code."""

    label: str
    lhs: M
    code_lhs: str  # ASCII, for the code form
    expr: sp.Expr


@dataclass(frozen=True)
class Code:
    """Preformatted text (a module's ``repr``)."""

    text: str


Block = Union[Heading, Para, Items, Equation, Compiled, Code]  # noqa: UP007


@dataclass(frozen=True)
class Document:
    """A derivation printout before rendering: a sequence of blocks."""

    blocks: tuple[Block, ...]


# -- printing expressions ------------------------------------------------------------------


class _LatexPrinter(LatexPrinter):
    """SymPy's LaTeX printer, kept to what amsmath, KaTeX *and* matplotlib's mathtext accept.

    ``Piecewise`` is one line (mathtext has no ``cases``), braces are ``\\lbrace`` (Markdown
    eats ``\\{``), the stable primitives print as ``σ`` and ``softplus``, a gradient
    ``grad_X`` as ``\\overline{X}`` and a CSE temporary ``_t3`` as ``t_{3}``.
    """

    def _function(self, name: str, expr: sp.Expr, exp: str | None) -> str:
        head = name if exp is None else f"{name}^{{{exp}}}"
        args = ", ".join(self._print(a) for a in expr.args)
        return rf"{head}\left({args}\right)"

    def _print_sigmoid(self, expr: sp.Expr, exp: str | None = None) -> str:
        return self._function(r"\sigma", expr, exp)

    def _print_softplus(self, expr: sp.Expr, exp: str | None = None) -> str:
        return self._function(r"\operatorname{softplus}", expr, exp)

    def _print_log1p(self, expr: sp.Expr, exp: str | None = None) -> str:
        return self._function(r"\operatorname{log1p}", expr, exp)

    def _print_expm1(self, expr: sp.Expr, exp: str | None = None) -> str:
        return self._function(r"\operatorname{expm1}", expr, exp)

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        parts = []
        for value, cond in expr.args:
            if cond == sp.true:
                parts.append(rf"{self._print(value)} \ \text{{otherwise}}")
            else:
                parts.append(rf"{self._print(value)} \ \text{{if}}\ {self._print(cond)}")
        return r"\left\lbrace " + r";\quad ".join(parts) + r" \right."

    def _print_ReduceMax(self, expr: ReduceMax) -> str:
        ranges = [
            rf"{self._print(lo)} \leq {self._print(var)} \leq {self._print(hi)}"
            for var, lo, hi in expr.limits
        ]
        under = ranges[0] if len(ranges) == 1 else r"\substack{" + r"\\".join(ranges) + "}"
        body = self.parenthesize(expr.function, PRECEDENCE["Mul"], strict=True)
        return rf"\max_{{{under}}} {body}"

    def _print_Symbol(self, expr: sp.Symbol, style: str = "plain") -> str:
        name = expr.name
        temp = re.fullmatch(r"_t(\d+)", name)
        if temp:
            return rf"t_{{{temp.group(1)}}}"
        if name.startswith("grad_") and len(name) > 5:
            rest = name[5:]
            inner = latex(sp.Symbol(rest))
            if inner == rest and len(rest) > 1:  # a word, not a letter or a Greek name
                inner = rf"\mathrm{{{rest}}}"
            return rf"\overline{{{inner}}}"
        return str(super()._print_Symbol(expr, style))


def latex(expr: sp.Basic) -> str:
    """The LaTeX of ``expr`` as the printouts write it (see :class:`_LatexPrinter`)."""
    return str(_LatexPrinter().doprint(expr))


def _text(expr: sp.Basic) -> str:
    return sp.sstr(expr)


def _sym(name: str) -> M:
    """A plain symbol name as a math fragment (``z_1`` → ``z_{1}``)."""
    return M(name, latex(sp.Symbol(name)))


def _elem(expr: sp.Basic) -> M:
    return M(_text(expr), latex(expr))


def _partial(num: sp.Basic | str, den: sp.Basic | str) -> M:
    """``∂num/∂den`` as a math fragment."""
    n = _sym(num) if isinstance(num, str) else _elem(num)
    d = _sym(den) if isinstance(den, str) else _elem(den)
    return M(f"∂{n.text}/∂{d.text}", rf"\frac{{\partial {n.latex}}}{{\partial {d.latex}}}")


EQ = M("=", "=")
DOT = M("·", r"\cdot")
LP = M("(", r"\left(")
RP = M(")", r"\right)")

# -- rendering -----------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#$])")
# Unicode that prose may contain (rewrite reasons, labels) → LaTeX.
_TEX_UNICODE = {
    "σ": r"$\sigma$", "Σ": r"$\Sigma$", "∂": r"$\partial$", "δ": r"$\delta$", "·": r"$\cdot$",
    "→": r"$\rightarrow$", "≈": r"$\approx$", "≤": r"$\leq$", "≥": r"$\geq$", "×": r"$\times$",
    "−": "-", "—": "---", "–": "--", "…": r"\ldots{}", "θ": r"$\theta$", "ℓ": r"$\ell$",
    "ℝ": r"$\mathbb{R}$", "ᵀ": r"$^{T}$", "✓": r"$\checkmark$", "’": "'",
}  # fmt: skip
_TEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
}  # fmt: skip


def _tex_escape(text: str) -> str:
    out = []
    for char in text:
        if char in _TEX_SPECIAL:
            out.append(_TEX_SPECIAL[char])
        elif char in _TEX_UNICODE:
            out.append(_TEX_UNICODE[char])
        elif ord(char) < 128:
            out.append(char)
        else:
            out.append("?")  # never reached by symgrad's own prose; keeps the output ASCII
    return "".join(out)


def _piece_text(piece: Piece) -> str:
    if isinstance(piece, str):
        return piece
    if isinstance(piece, (M, Name)):
        return piece.text
    return _text(piece)


def _piece_latex(piece: M | sp.Basic) -> str:
    return piece.latex if isinstance(piece, M) else latex(piece)


def _inline_markdown(pieces: Iterable[Piece]) -> str:
    out = []
    for piece in pieces:
        if isinstance(piece, str):
            out.append(_MD_SPECIAL.sub(r"\\\1", piece))
        elif isinstance(piece, Name):
            out.append(f"`{piece.text}`")
        else:
            out.append(f"${_piece_latex(piece)}$")
    return "".join(out)


def _inline_latex(pieces: Iterable[Piece]) -> str:
    out = []
    for piece in pieces:
        if isinstance(piece, str):
            out.append(_tex_escape(piece))
        elif isinstance(piece, Name):
            out.append(r"\texttt{" + _tex_escape(piece.text) + "}")
        else:
            out.append(f"${_piece_latex(piece)}$")
    return "".join(out)


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(
        text, 100, initial_indent=first, subsequent_indent=rest,
        break_long_words=False, break_on_hyphens=False,
    ) or [first.rstrip()]  # fmt: skip


def _render_text(doc: Document) -> str:
    lines: list[str] = []
    for block in doc.blocks:
        if isinstance(block, Heading):
            title = "".join(_piece_text(p) for p in block.pieces)
            if block.level == 1:
                lines += [title, "=" * len(title)]
            elif block.level == 2:
                lines += ["", title, "-" * len(title)]
            else:
                lines += ["", title]
        elif isinstance(block, Para):
            lines += _wrap("".join(_piece_text(p) for p in block.pieces), "  ", "  ")
        elif isinstance(block, Items):
            for item in block.items:
                lines += _wrap("".join(_piece_text(p) for p in item), "    - ", "      ")
        elif isinstance(block, Equation):
            body = " ".join(_piece_text(p) for p in block.pieces)
            lines.append(f"    {block.label}: {body}" if block.label else f"    {body}")
        elif isinstance(block, Code):
            lines += ["    " + line for line in block.text.splitlines()]
        else:
            lines.append(f"    {block.label}: {block.lhs.text} = {_text(block.expr)}")
    return "\n".join(lines) + "\n"


def _render_markdown(doc: Document) -> str:
    chunks: list[str] = []
    for block in doc.blocks:
        if isinstance(block, Heading):
            chunks.append("#" * block.level + " " + _inline_markdown(block.pieces))
        elif isinstance(block, Para):
            chunks.append(_inline_markdown(block.pieces))
        elif isinstance(block, Items):
            chunks.append("\n".join("- " + _inline_markdown(item) for item in block.items))
        elif isinstance(block, Equation):
            body = " ".join(_piece_latex(p) for p in block.pieces)
            label = _inline_markdown([block.label + ":"]) + "\n\n" if block.label else ""
            chunks.append(f"{label}$$\n{body}\n$$")
        elif isinstance(block, Code):
            chunks.append(f"```text\n{block.text}\n```")
        else:
            label = _inline_markdown([block.label + ":"])
            code = f"{block.code_lhs} = {_text(block.expr)}"
            chunks.append(
                f"{label}\n\n$$\n{block.lhs.latex} = {latex(block.expr)}\n$$\n\n"
                f"```text\n{code}\n```"
            )
    return "\n\n".join(chunks) + "\n"


def _render_latex(doc: Document) -> str:
    sections = {1: "section", 2: "subsection", 3: "subsubsection"}
    chunks: list[str] = []
    for block in doc.blocks:
        if isinstance(block, Heading):
            chunks.append(rf"\{sections[block.level]}*{{{_inline_latex(block.pieces)}}}")
        elif isinstance(block, Para):
            chunks.append(_inline_latex(block.pieces))
        elif isinstance(block, Items):
            items = "\n".join(r"  \item " + _inline_latex(item) for item in block.items)
            chunks.append("\\begin{itemize}\n" + items + "\n\\end{itemize}")
        elif isinstance(block, Equation):
            body = " ".join(_piece_latex(p) for p in block.pieces)
            label = _tex_escape(block.label) + ":\n" if block.label else ""
            chunks.append(f"{label}\\[\n{body}\n\\]")
        elif isinstance(block, Code):
            chunks.append(f"\\begin{{verbatim}}\n{block.text}\n\\end{{verbatim}}")
        else:
            code = f"{block.code_lhs} = {_text(block.expr)}"
            chunks.append(
                f"{_tex_escape(block.label)}:\n\\[\n{block.lhs.latex} = {latex(block.expr)}\n\\]\n"
                f"\\begin{{verbatim}}\n{code}\n\\end{{verbatim}}"
            )
    return "\n\n".join(chunks) + "\n"


# -- shared pieces -------------------------------------------------------------------------


@dataclass(frozen=True)
class CseSummary:
    """``sympy.cse`` of a kernel's expressions, after lowering the stable primitives.

    ``temporaries`` are ``(_t0, value), ...`` in evaluation order, ``results`` the expressions
    rewritten with them; ``ops_before``/``ops_after`` are ``sympy.count_ops`` totals without and
    with the temporaries.
    """

    temporaries: tuple[tuple[sp.Symbol, sp.Expr], ...]
    results: tuple[sp.Expr, ...]
    ops_before: int
    ops_after: int


def _bound_symbols(exprs: Iterable[sp.Basic]) -> list[sp.Symbol]:
    bound: set[sp.Symbol] = set()
    for expr in exprs:
        for node in sp.preorder_traversal(expr):
            if isinstance(node, (sp.Sum, ReduceMax)):
                bound.update(var for var, *_ in node.limits)
    return sorted(bound, key=sp.default_sort_key)


def cse_summary(exprs: Sequence[sp.Expr]) -> CseSummary:
    """Common subexpressions of ``exprs`` as a kernel computes them (see :class:`CseSummary`).

    The stable primitives are lowered first (``σ`` and ``softplus`` by sign, sharing
    ``exp(-|a|)``), as :func:`~symgrad.codegen.emit.lower_primitives` does before the emitter's
    own ``sympy.cse``.  No temporary depends on a summation index: such a value is not one
    number but a different one per term of its sum.
    """
    lowered = [lower_primitives(e) for e in exprs]
    replacements, reduced = sp.cse(
        lowered, symbols=sp.numbered_symbols("_t"), ignore=_bound_symbols(lowered)
    )
    before = sum(int(sp.count_ops(e)) for e in lowered)
    after = sum(int(sp.count_ops(v)) for _, v in replacements)
    after += sum(int(sp.count_ops(r)) for r in reduced)
    return CseSummary(tuple(replacements), tuple(reduced), before, after)


def _rewrite_items(rewrites: Sequence[Rewrite]) -> Items:
    """One item per distinct rewrite, in order of first application (repeats counted)."""
    seen: dict[tuple[str, sp.Basic, sp.Basic], int] = {}
    order: list[Rewrite] = []
    for rw in rewrites:
        key = (rw.rule, rw.before, rw.after)
        if key not in seen:
            seen[key] = 0
            order.append(rw)
        seen[key] += 1
    items = []
    for rw in order:
        times = seen[(rw.rule, rw.before, rw.after)]
        again = f" (applied {times} times)" if times > 1 else ""
        items.append((Name(rw.rule), ": ", rw.before, "  →  ", rw.after, f" — {rw.why}{again}"))
    return Items(tuple(items))


def _cse_blocks(summary: CseSummary, labels: Sequence[M], intro: str, what: str) -> list[Block]:
    blocks: list[Block] = [Heading(2, ("Common subexpressions",)), Para((intro,))]
    if summary.temporaries:
        blocks.append(Para(("Temporaries, in evaluation order:",)))
        for sym, value in summary.temporaries:
            blocks.append(Equation("", (_elem(sym), EQ, value)))
        blocks.append(Para((f"and {what} written with them:",)))
    else:
        blocks.append(
            Para(("No subexpression occurs twice; ", what, " are evaluated as they are:"))
        )
    for label, result in zip(labels, summary.results, strict=True):
        blocks.append(Equation("", (label, EQ, result)))
    blocks.append(
        Para(
            (
                f"Operation count (sympy.count_ops): {summary.ops_before} without CSE, "
                f"{summary.ops_after} with CSE "
                f"({_plural(len(summary.temporaries), 'temporary', 'temporaries')}).",
            )
        )
    )
    return blocks


def _forward_blocks(
    y: M, code: str, forward: sp.Expr, rewrites: Sequence[Rewrite], stable: sp.Expr
) -> list[Block]:
    """The forward formula, the kink rule, the stability rewrites and the compiled forward.

    (Between the rewrites and the compiled forward, the derivation canonicalizes, simplifies
    and stabilizes again, which is why the two can differ.)
    """
    blocks: list[Block] = [Heading(2, ("Forward",)), Equation("as defined", (y, EQ, forward))]
    kinks = prepare(forward)
    if kinks != forward:
        blocks.append(
            Equation(
                "Max/Min with a constant become Piecewise, the tie on the constant's side (so "
                "the derivative at the kink is 0, as in torch)",
                (y, EQ, kinks),
            )
        )
    if rewrites:
        blocks.append(Para(("Stability rewrites applied to the forward formula:",)))
        blocks.append(_rewrite_items(rewrites))
    else:
        blocks.append(Para(("No stability rewrite applies to the forward formula.",)))
    blocks.append(Compiled("compiled (stable forward)", y, code, stable))
    return blocks


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _output_name(inputs: Sequence[str]) -> str:
    return next(n for n in ("y", "f", "out", "out_") if n not in inputs)


# -- elementwise ops -----------------------------------------------------------------------


def _elementwise_document(d: Derivation) -> Document:
    names = [s.name for s in d.inputs]
    out = _output_name(names)
    y = _sym(out)
    blocks: list[Block] = [
        Heading(1, ("Derivation of ", Name(f"{d.name}({', '.join(names)})"))),
    ]
    intro: list[Piece] = [
        "Elementwise op ",
        Name(d.name),
        " with input(s) ",
        *_join([sp.Symbol(n) for n in names]),
        "; its output ",
        y,
        " and gradients are computed element by element.",
    ]
    if d.constants:
        intro += [" Constants: ", ", ".join(f"{k} = {v!r}" for k, v in d.constants), "."]
    blocks.append(Para(tuple(intro)))

    blocks += _forward_blocks(y, out, d.forward, d.forward_rewrites, d.stable_forward)

    blocks.append(Heading(2, ("Local partial derivatives",)))
    for p in d.partials:
        dy = _partial(out, p.wrt.name)
        blocks.append(Heading(3, (dy,)))
        blocks.append(Equation("diff (sympy.diff of the stable forward)", (dy, EQ, p.raw)))
        if p.simplified != p.raw:
            blocks.append(
                Equation("simplified (canonicalized, then simplified)", (dy, EQ, p.simplified))
            )
        else:
            blocks.append(Para(("Canonicalizing and simplifying leave it unchanged.",)))
        if p.rewrites:
            blocks.append(Para(("Stability rewrites:",)))
            blocks.append(_rewrite_items(p.rewrites))
        blocks.append(Compiled("compiled", dy, f"d{out}_d{p.wrt.name}", p.final))

    blocks.append(Heading(2, ("Chain rule",)))
    grad_out = sp.Symbol(f"grad_{out}")
    blocks.append(
        Para(
            (
                "With ",
                _elem(grad_out),
                " = ∂L/∂",
                out,
                " the gradient arriving from a loss L downstream, each input's gradient is one "
                "product, element by element:",
            )
        )
    )
    for p in d.partials:
        grad_x = sp.Symbol(f"grad_{p.wrt.name}")
        dy = _partial(out, p.wrt.name)
        blocks.append(
            Equation("", (_elem(grad_x), EQ, _elem(grad_out), DOT, dy, EQ, grad_out * p.final))
        )

    summary = cse_summary([d.stable_forward, *d.gradients])
    labels = [y, *(_partial(out, p.wrt.name) for p in d.partials)]
    blocks += _cse_blocks(
        summary,
        labels,
        "The value-and-gradient kernel computes the output and every partial derivative in one "
        "pass. σ and softplus are first lowered to their evaluate-by-sign forms (sharing "
        "exp(-|a|)); sympy.cse then names what repeats.",
        "the output and the partial derivatives",
    )
    return Document(tuple(blocks))


def _join(exprs: Sequence[Piece], sep: str = ", ") -> list[Piece]:
    out: list[Piece] = []
    for n, e in enumerate(exprs):
        if n:
            out.append(sep)
        out.append(e)
    return out


# -- tensor ops ----------------------------------------------------------------------------


def _count(expr: sp.Basic, kind: type) -> int:
    return sum(1 for node in sp.preorder_traversal(expr) if isinstance(node, kind))


def local_partial(d: TensorDerivation, p: TensorPartial) -> sp.Expr:
    """``∂Y[out]/∂X[k]``: the raw chain-rule sum's summand divided by ``grad_out[out]``."""
    spec = d.spec
    grad = d.grad_output[spec.out] if spec.out else d.grad_output
    body = p.raw.function if spec.out and isinstance(p.raw, sp.Sum) else p.raw
    return sp.Mul(body, 1 / grad)


def _shape_piece(base: sp.IndexedBase) -> M:
    dims = " × ".join(_text(d) for d in base.shape)
    tex_dims = r" \times ".join(latex(d) for d in base.shape)
    field = "Z" if base.is_integer else "R"  # integer tensors: ids, labels
    kind = " (integers)" if base.is_integer else ""
    return M(
        f"{base.label}: {dims}{kind}",
        rf"{latex(base.label)} \in \mathbb{{{field}}}^{{{tex_dims}}}",
    )


def _range_piece(index: sp.Expr, lo: sp.Expr, hi: sp.Expr) -> M:
    return M(
        f"{_text(lo)} ≤ {_text(index)} ≤ {_text(hi)}",
        rf"{latex(lo)} \leq {latex(index)} \leq {latex(hi)}",
    )


def _tensor_document(d: TensorDerivation) -> Document:
    spec = d.spec
    Y = sp.IndexedBase("Y")
    y_elem: sp.Basic = Y[spec.out] if spec.out else sp.Symbol("Y")
    y = _elem(y_elem)
    blocks: list[Block] = [Heading(1, ("Derivation of ", Name(d.name), " (index notation)"))]
    intro: list[Piece] = [
        "Tensor op ",
        Name(d.name),
        " with inputs ",
        *_join([_shape_piece(b) for b in spec.inputs]),
        "; output element ",
        y,
    ]
    if spec.out:
        ranges = dict(spec.ranges)
        intro += [" for ", *_join([_range_piece(i, *ranges[i]) for i in spec.out])]
    else:
        intro.append(" (a scalar)")
    intro.append(".")
    if spec.constants:
        intro += [" Constants: ", ", ".join(f"{k} = {v!r}" for k, v in spec.constants), "."]
    blocks.append(Para(tuple(intro)))

    blocks += _forward_blocks(y, _text(y_elem), spec.expr, d.forward_rewrites, d.stable_forward)

    blocks.append(Heading(2, ("Vector-Jacobian products",)))
    blocks.append(
        Para(
            (
                _elem(d.grad_output[spec.out] if spec.out else d.grad_output),
                " = ∂L/∂",
                y,
                " is the gradient arriving from a loss L downstream. For each input, sympy.diff "
                "of the forward with respect to one element gives Kronecker deltas; the chain "
                "rule sums their product with the incoming gradient over every output element; "
                "symgrad's contraction removes the deltas (Σ_j δ(j, k)·f(j) = f(k) when k ranges "
                "over the values of j).",
            )
        )
    )
    for p in d.partials:
        target = p.wrt[p.indices] if p.indices else p.wrt
        grad = sp.IndexedBase(f"grad_{p.wrt.label}")
        g_elem: sp.Basic = grad[p.indices] if p.indices else sp.Symbol(f"grad_{p.wrt.label}")
        g = _elem(g_elem)
        blocks.append(Heading(3, (g,)))
        blocks.append(
            Equation(
                "local partial derivative", (_partial(y_elem, target), EQ, local_partial(d, p))
            )
        )
        blocks.append(Equation("chain rule", (g, EQ, p.raw)))
        blocks.append(
            Para(
                (
                    "Kronecker contraction: "
                    f"{_plural(_count(p.raw, sp.KroneckerDelta), 'delta', 'deltas')} under "
                    f"{_plural(_count(p.raw, sp.Sum), 'sum', 'sums')} before, "
                    f"{_plural(_count(p.contracted, sp.KroneckerDelta), 'delta', 'deltas')} and "
                    f"{_plural(_count(p.contracted, sp.Sum), 'sum', 'sums')} after.",
                )
            )
        )
        blocks.append(Equation("contracted", (g, EQ, p.contracted)))
        if p.rewrites:
            blocks.append(Para(("Stability rewrites:",)))
            blocks.append(_rewrite_items(p.rewrites))
        blocks.append(Compiled("compiled", g, _text(g_elem), p.final))

    summary = cse_summary([d.stable_forward, *(p.final for p in d.partials)])
    labels = [y]
    for p in d.partials:
        grad = sp.IndexedBase(f"grad_{p.wrt.label}")
        labels.append(_elem(grad[p.indices] if p.indices else sp.Symbol(f"grad_{p.wrt.label}")))
    blocks += _cse_blocks(
        summary,
        labels,
        "sympy.cse over the compiled forward and gradient expressions, after σ and softplus are "
        "lowered to their evaluate-by-sign forms; a summation index never leaves its sum. (The "
        "loop generator also computes each distinct reduction once per row and lowers "
        "contractions to BLAS.)",
        "the forward and the gradients",
    )
    return Document(tuple(blocks))


# -- networks ------------------------------------------------------------------------------

_b, _i = sp.symbols("b i", integer=True)
_BATCH = sp.Symbol("B", integer=True, positive=True)


@dataclass(frozen=True)
class LayerFactors:
    """One layer of a network, in the network's names.

    ``forward`` is ``element = expression``; ``local`` the local partial derivatives
    ``(wrt element, ∂element/∂wrt)``; ``vjps`` the reverse-mode steps ``(gradient element,
    expression)``, each the op's compiled VJP with the network's names put in.
    """

    position: int
    title: str
    op: str
    input: sp.IndexedBase
    output: sp.IndexedBase
    element: sp.Expr
    forward: sp.Expr
    local: tuple[tuple[sp.Expr, sp.Expr], ...]
    vjps: tuple[tuple[sp.Expr, sp.Expr], ...]
    parameters: tuple[tuple[sp.IndexedBase, str], ...]
    note: str = ""


@dataclass(frozen=True)
class LossFactors:
    """The loss: per-element (or per-row) loss, its mean ``L``, and the seed gradient."""

    title: str
    op: str
    input: sp.IndexedBase
    element: sp.Expr
    forward: sp.Expr
    total: sp.Expr
    seed: tuple[sp.Expr, sp.Expr]
    note: str


@dataclass(frozen=True)
class Fusion:
    """A final activation folded into the loss (:func:`symgrad.nn.fuse`), factor by factor.

    With ``p = activation(z)`` and loss ``ℓ(p, y)``: the local factors ``∂ℓ/∂p`` (as
    differentiated, and simplified) and ``∂p/∂z`` (in ``z``, and in ``p``), their product
    simplified (in ``p``, then in ``z``), and the fused op's compiled derivative ``∂ℓ/∂z``;
    ``agrees`` says whether the product and the compiled derivative were shown equal.
    """

    activation: str
    loss: str
    fused: str
    z: sp.Symbol
    p: sp.Symbol
    y: sp.Symbol
    activation_forward: sp.Expr
    loss_forward: sp.Expr
    fused_forward: sp.Expr
    loss_factor_raw: sp.Expr
    loss_factor: sp.Expr
    activation_factor: sp.Expr
    activation_factor_p: sp.Expr
    product: sp.Expr
    product_z: sp.Expr
    fused_final: sp.Expr
    agrees: bool


@dataclass(frozen=True)
class NetworkDerivation(Printouts):
    """The chain rule through a ``Sequential`` and its loss (see :func:`network_derivation`)."""

    title: str
    model: str
    input: sp.IndexedBase
    layers: tuple[LayerFactors, ...]
    loss: LossFactors
    fusion: Fusion | None
    chains: tuple[tuple[sp.IndexedBase, tuple[M, ...]], ...]


def _renamer(
    bases: Mapping[sp.IndexedBase, Callable[[tuple[sp.Expr, ...]], sp.Expr]],
    symbols: Mapping[sp.Basic, sp.Expr],
) -> Callable[[sp.Expr], sp.Expr]:
    """Put a network's names into an op's expression: tensors by callable, symbols by value."""

    def rename(expr: sp.Expr) -> sp.Expr:
        out = expr.replace(
            lambda e: isinstance(e, sp.Indexed) and e.base in bases,  # type: ignore[arg-type]
            lambda e: bases[e.base](tuple(e.indices)),  # type: ignore[arg-type]
        )
        return out.xreplace(dict(symbols))

    return rename


def _tensor(name: str, *shape: sp.Expr) -> sp.IndexedBase:
    return sp.IndexedBase(name, shape=shape)


def _put(base: sp.IndexedBase, perm: tuple[int, ...] | None = None) -> Callable[..., sp.Expr]:
    def make(indices: tuple[sp.Expr, ...]) -> sp.Expr:
        return base[tuple(indices[k] for k in perm)] if perm else base[indices]

    return make


def _dim(d: TensorDerivation, name: str) -> sp.Symbol:
    return next(s for s in d.spec.dims if s.name == name)


def _tensor_layer(
    position: int,
    title: str,
    op: Any,
    input_: sp.IndexedBase,
    output: sp.IndexedBase,
    params: Sequence[tuple[str, sp.IndexedBase, tuple[int, ...] | None, str]],
    dims: Mapping[str, int],
    first: bool,
) -> LayerFactors:
    """A layer computed by a tensor op: ``params`` maps op input labels to network tensors."""
    d: TensorDerivation = op.derivation()
    spec = d.spec
    labels = {str(b.label): b for b in spec.inputs}
    data_label = str(spec.inputs[0].label)
    bases: dict[sp.IndexedBase, Callable[..., sp.Expr]] = {labels[data_label]: _put(input_)}
    for label, base, perm, _ in params:
        bases[labels[label]] = _put(base, perm)
    grad_out = _tensor(f"grad_{output.label}", *output.shape)
    bases[d.grad_output] = _put(grad_out)
    symbols: dict[sp.Basic, sp.Expr] = {_dim(d, k): sp.Integer(v) for k, v in dims.items()}
    for p in d.partials:
        symbols.update({k: sp.Symbol(f"k{n}", integer=True) for n, k in enumerate(p.indices)})
    rename = _renamer(bases, symbols)
    element = output[spec.out]
    local: list[tuple[sp.Expr, sp.Expr]] = []
    vjps: list[tuple[sp.Expr, sp.Expr]] = []
    for p in d.partials:
        label = str(p.wrt.label)
        if label == data_label:
            target, gbase, perm = input_, _tensor(f"grad_{input_.label}", *input_.shape), None
            if first:
                continue
        else:
            _, target, perm, _ = next(q for q in params if q[0] == label)
            gbase = _tensor(f"grad_{target.label}", *target.shape)
        indices = tuple(rename(k) for k in p.indices)
        ordered = tuple(indices[k] for k in perm) if perm else indices
        local.append((target[ordered], rename(local_partial(d, p))))
        vjps.append((gbase[ordered], rename(p.final)))
    note = "The network's input needs no gradient: its VJP is not computed." if first else ""
    return LayerFactors(
        position, title, op.name, input_, output, element, rename(spec.expr),
        tuple(local), tuple(vjps), tuple((base, state) for _, base, _, state in params), note,
    )  # fmt: skip


def _elementwise_layer(
    position: int, title: str, op: Any, input_: sp.IndexedBase, output: sp.IndexedBase
) -> LayerFactors:
    d: Derivation = op.derivation()
    (x,) = d.inputs
    at = {x: input_[_b, _i]}
    derivative = d.partials[0].final.xreplace(at)
    grad_in = _tensor(f"grad_{input_.label}", *input_.shape)
    grad_out = _tensor(f"grad_{output.label}", *output.shape)
    return LayerFactors(
        position, title, op.name, input_, output, output[_b, _i], d.forward.xreplace(at),
        ((input_[_b, _i], derivative),), ((grad_in[_b, _i], grad_out[_b, _i] * derivative),), (),
    )  # fmt: skip


def _fusion(activation: Any, loss: Any, fused: Any, zname: str, pname: str) -> Fusion:
    act_d: Derivation = activation.op.derivation()
    loss_d: Derivation = loss.op.derivation()
    fused_d: Derivation = fused.op.derivation()
    z, p, y = (sp.Symbol(n, real=True) for n in (zname, pname, "y"))
    (xa,) = act_d.inputs
    lp, lt = loss_d.inputs
    fz, fy = fused_d.inputs
    act_value = act_d.stable_forward.xreplace({xa: z})
    in_p = {lp: p, lt: y}
    loss_factor = loss_d.partials[0].simplified.xreplace(in_p)
    act_factor = act_d.partials[0].simplified.xreplace({xa: z})
    act_factor_p = act_factor.xreplace({act_value: p})
    product = bounded_simplify(canonicalize(loss_factor * act_factor_p))
    product_z = stabilize(product.xreplace({p: act_value})).expr
    fused_final = fused_d.partials[0].final.xreplace({fz: z, fy: y})
    agrees = bounded_simplify(canonicalize(product_z - fused_final)) == 0
    return Fusion(
        activation.op.name, loss.op.name, fused.op.name, z, p, y,
        act_d.forward.xreplace({xa: z}), loss_d.forward.xreplace(in_p),
        fused_d.stable_forward.xreplace({fz: z, fy: y}),
        loss_d.partials[0].raw.xreplace(in_p), loss_factor, act_factor, act_factor_p,
        product, product_z, fused_final, bool(agrees),
    )  # fmt: skip


def network_derivation(
    model: Module,
    loss: Loss,
    *,
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> NetworkDerivation:
    """The chain rule through ``model`` (a ``Sequential``) into ``loss``, layer by layer.

    Supported: ``Linear`` (with or without bias), ``LayerNorm`` and elementwise activations
    (any :class:`~symgrad.nn.Elementwise`), then an elementwise loss (``MSELoss``,
    ``BCELoss``, ``BCEWithLogitsLoss``, any ``ElementwiseLoss``) or ``CrossEntropyLoss``.  A
    final activation before an elementwise loss is fused into it exactly as training does
    (:func:`symgrad.nn.fuse`), and the fusion is shown factor by factor.

    Args:
        model: the network; ``x: (B, in_features)``.
        loss: its loss (mean reduction, as in training).
        names: the name of each module's output (default ``z_k`` after the k-th parametrized
            layer, ``h_k`` after an activation).
        title: the printout's title.

    Every expression is an op's own derivation with the network's names put in: tensors
    ``W_k``/``c_k`` for ``k.weight``/``k.bias``, the layer sizes for the dims ``N``, ``M``,
    ``grad_v`` for the gradient ``∂L/∂v`` of the mean loss ``L``.
    """
    from .api import builtin
    from .nn.losses import CrossEntropyLoss, ElementwiseLoss, fuse
    from .nn.modules import Elementwise, LayerNorm, Linear, Sequential

    if not isinstance(model, Sequential):
        raise ExplainError(f"network_derivation takes a Sequential, got {type(model).__name__}")
    modules = [model[k] for k in range(len(model))]
    if names is not None and len(names) != len(modules):
        raise ExplainError(f"names has {len(names)} entries for {len(modules)} modules")
    body, train_loss = fuse(model, loss)
    fused = train_loss is not loss

    # names of every module's output
    chosen: list[str] = []
    k = 0
    for pos, module in enumerate(modules):
        if isinstance(module, (Linear, LayerNorm)):
            k += 1
            default = f"z_{k}" if isinstance(module, Linear) else f"u_{k}"
        else:
            default = f"h_{k}"
        name = names[pos] if names is not None else default
        if name in chosen or name in ("x", "y", "L", "T"):
            name = f"v_{pos + 1}"
        chosen.append(name)

    width: sp.Expr = sp.Symbol("D", integer=True, positive=True)
    for module in modules:
        if isinstance(module, Linear):
            width = sp.Integer(module.in_features)
            break
        if isinstance(module, LayerNorm):
            width = sp.Integer(module.normalized_shape)
            break
    x = _tensor("x", _BATCH, width)
    current = x
    layers: list[LayerFactors] = []
    params_of: list[tuple[int, sp.IndexedBase]] = []
    n_body = len(modules) - (1 if fused else 0)
    k = 0
    for pos in range(n_body):
        module = modules[pos]
        if isinstance(module, Linear):
            k += 1
            out = _tensor(chosen[pos], _BATCH, module.out_features)
            W = _tensor(f"W_{k}", module.out_features, module.in_features)
            dims = {"N": module.in_features, "M": module.out_features}
            if module.bias is not None:
                c = _tensor(f"c_{k}", module.out_features)
                weights = [("W", W, None, f"{pos}.weight"), ("c", c, None, f"{pos}.bias")]
                layer = _tensor_layer(
                    pos, repr(module), builtin("linear"), current, out, weights, dims, pos == 0
                )
            else:
                layer = _tensor_layer(
                    pos, repr(module), builtin("linear_nobias"), current, out,
                    [("W", W, None, f"{pos}.weight")], dims, pos == 0,
                )  # fmt: skip
        elif isinstance(module, LayerNorm):
            k += 1
            n = module.normalized_shape
            out = _tensor(chosen[pos], _BATCH, n)
            g = _tensor(f"gamma_{k}", n)
            beta = _tensor(f"beta_{k}", n)
            layer = _tensor_layer(
                pos, repr(module), builtin("layer_norm", eps=module.eps), current, out,
                [("w", g, None, f"{pos}.weight"), ("beta", beta, None, f"{pos}.bias")],
                {"N": n}, pos == 0,
            )  # fmt: skip
        elif isinstance(module, Elementwise):
            out = _tensor(chosen[pos], *current.shape)
            layer = _elementwise_layer(pos, repr(module), module.op, current, out)
        else:
            raise ExplainError(
                f"network_derivation cannot explain module {pos} ({type(module).__name__}); "
                "supported: Linear, LayerNorm and elementwise activations"
            )
        layers.append(layer)
        params_of += [(len(layers) - 1, base) for base, _ in layer.parameters]
        current = out

    last = current
    if isinstance(train_loss, CrossEntropyLoss):
        loss_factors = _cross_entropy_factors(train_loss, last)
    elif isinstance(train_loss, ElementwiseLoss):
        loss_factors = _elementwise_loss_factors(train_loss, last, fused)
        if fused:
            title = f"{loss!r} with {modules[-1]!r} fused into it"
            loss_factors = dataclasses.replace(loss_factors, title=title)
    else:
        raise ExplainError(
            f"network_derivation cannot explain the loss {type(loss).__name__}; supported: "
            "elementwise losses and CrossEntropyLoss"
        )
    fusion = None
    if fused:
        assert isinstance(body, Sequential) and isinstance(loss, ElementwiseLoss)
        zname = str(last.label) if n_body else "x"
        fusion = _fusion(modules[-1], loss, train_loss, zname, chosen[-1])

    chains = []
    for index, param in params_of:
        pieces: list[M] = [_partial("L", str(param.label)), EQ, _partial("L", str(last.label))]
        for layer in reversed(layers[index + 1 :]):
            pieces += [DOT, _partial(str(layer.output.label), str(layer.input.label))]
        pieces += [DOT, _partial(str(layers[index].output.label), str(param.label))]
        chains.append((param, tuple(pieces)))

    return NetworkDerivation(
        title or "Derivation of a network and its loss",
        repr(model),
        x,
        tuple(layers),
        loss_factors,
        fusion,
        tuple(chains),
    )


def _elementwise_loss_factors(loss: Any, last: sp.IndexedBase, fused: bool) -> LossFactors:
    d: Derivation = loss.op.derivation()
    a, t = d.inputs
    y = _tensor("y", *last.shape)
    at = {a: last[_b, _i], t: y[_b, _i]}
    ell = _tensor("ell", *last.shape)
    batch, width = last.shape
    count = batch * width
    total = sp.Sum(ell[_b, _i], (_b, 0, batch - 1), (_i, 0, width - 1)) / count
    grad = _tensor(f"grad_{last.label}", *last.shape)
    seed = (grad[_b, _i], d.partials[0].final.xreplace(at) / count)
    note = f"Mean over all {_text(count)} elements, as in training; y holds the targets." + (
        " The loss is the fused op, so its derivative is the whole of ∂L/∂"
        f"{last.label} (see the fusion above)."
        if fused
        else ""
    )
    return LossFactors(
        repr(loss), loss.op.name, last, ell[_b, _i], d.forward.xreplace(at), total, seed, note
    )


def _cross_entropy_factors(loss: Any, last: sp.IndexedBase) -> LossFactors:
    d: TensorDerivation = loss.op.derivation()
    batch, classes = last.shape
    X, T = d.spec.inputs
    onehot = _tensor("T", *last.shape)
    ell = _tensor("ell", batch)
    bases: dict[sp.IndexedBase, Callable[..., sp.Expr]] = {X: _put(last), T: _put(onehot)}
    symbols: dict[sp.Basic, sp.Expr] = {_dim(d, "N"): classes}
    rename = _renamer(bases, symbols)
    (b,) = d.spec.out
    px = d.partials[0]
    ks = {k: sp.Symbol(f"k{n}", integer=True) for n, k in enumerate(px.indices)}
    seed_rename = _renamer({**bases, d.grad_output: lambda _: 1 / batch}, {**symbols, **ks})
    grad = _tensor(f"grad_{last.label}", *last.shape)
    total = sp.Sum(ell[b], (b, 0, batch - 1)) / batch
    seed = (grad[tuple(ks[k] for k in px.indices)], seed_rename(px.final))
    note = (
        "Mean over the batch, as in training; T is the one-hot encoding of the integer labels "
        "(T[b, i] = 1 if row b has label i, else 0), so the incoming gradient of every row's "
        f"loss is 1/{_text(batch)}."
    )
    return LossFactors(
        repr(loss), loss.op.name, last, ell[b], rename(d.spec.expr), total, seed, note
    )


def _network_document(nd: NetworkDerivation) -> Document:
    L = sp.Symbol("L")
    blocks: list[Block] = [Heading(1, (nd.title,))]
    blocks.append(
        Para(
            (
                "Every expression below is the compiled derivation of one op with the network's "
                "names put in: the input x, each layer's output, the weights W_k and biases c_k "
                "(named after the layer's state-dict entries), and the gradient grad_v = ∂L/∂v of "
                "the mean loss L with respect to each quantity v.",
            )
        )
    )
    blocks.append(Code(nd.model))

    blocks.append(Heading(2, ("Forward definitions",)))
    for layer in nd.layers:
        blocks.append(
            Para((f"Layer {layer.position}: ", Name(layer.title), " (op ", Name(layer.op), ")"))
        )
        blocks.append(Equation("", (_elem(layer.element), EQ, layer.forward)))
        if layer.parameters:
            blocks.append(
                Items(
                    tuple(
                        (_shape_piece(base), " is ", Name(state))
                        for base, state in layer.parameters
                    )
                )
            )
    f = nd.fusion
    if f is not None:
        blocks.append(Para(("Final activation (fused into the loss below): ", Name(f.activation))))
        blocks.append(Equation("", (_elem(f.p), EQ, f.activation_forward)))
    lf = nd.loss
    blocks.append(Para(("Loss: ", Name(lf.title), " (op ", Name(lf.op), ")")))
    blocks.append(Equation("", (_elem(lf.element), EQ, lf.forward)))
    blocks.append(Equation("", (_elem(L), EQ, lf.total)))
    blocks.append(Para((lf.note,)))

    if f is not None:
        dl_dp, dp_dz = _partial("ell", f.p.name), _partial(f.p.name, f.z.name)
        dl_dz = _partial("ell", f.z.name)
        blocks.append(Heading(2, ("Fusing ", Name(f.activation), " into ", Name(f.loss))))
        blocks.append(
            Para(
                (
                    "With ",
                    _elem(f.p),
                    " = ",
                    f.activation_forward,
                    " the loss ",
                    _elem(sp.Symbol("ell")),
                    " = ",
                    f.loss_forward,
                    " depends on ",
                    _elem(f.z),
                    " through ",
                    _elem(f.p),
                    ". The chain rule multiplies two local factors:",
                )
            )
        )
        blocks.append(Equation("", (dl_dz, EQ, dl_dp, DOT, dp_dz)))
        pieces: list[M | sp.Basic] = [dl_dp, EQ, f.loss_factor_raw]
        if f.loss_factor != f.loss_factor_raw:
            pieces += [EQ, f.loss_factor]
        blocks.append(Equation(f"local factor (derivation of {f.loss})", tuple(pieces)))
        pieces = [dp_dz, EQ, f.activation_factor]
        if f.activation_factor_p != f.activation_factor:
            pieces += [EQ, f.activation_factor_p]
        blocks.append(Equation(f"local factor (derivation of {f.activation})", tuple(pieces)))
        pieces = [dl_dz, EQ, LP, f.loss_factor, RP, DOT, LP, f.activation_factor_p, RP]
        pieces += [EQ, f.product]
        if f.product_z != f.product:
            pieces += [EQ, f.product_z]
        blocks.append(Equation("product, simplified", tuple(pieces)))
        blocks.append(
            Para(
                (
                    "symgrad composes the two formulas before differentiating — the fused op ",
                    Name(f.fused),
                    ", stable forward ",
                    _elem(sp.Symbol("ell")),
                    " = ",
                    f.fused_forward,
                    " — and compiles its derivative:",
                )
            )
        )
        blocks.append(Compiled("compiled", dl_dz, f"dell_d{f.z.name}", f.fused_final))
        blocks.append(
            Para(
                (
                    "The product of the factors and the compiled derivative are equal (checked "
                    "symbolically)."
                    if f.agrees
                    else "symgrad could not show the product of the factors equal to the compiled "
                    "derivative symbolically; the compiled derivative is the one trained with.",
                )
            )
        )

    blocks.append(Heading(2, ("Backward, layer by layer",)))
    grad_elem, seed = lf.seed
    blocks.append(
        Para(("The seed: the loss's own derivative (op ", Name(lf.op), "), scaled by the mean:"))
    )
    blocks.append(Compiled("compiled", _elem(grad_elem), _text(grad_elem), seed))
    for layer in reversed(nd.layers):
        blocks.append(Heading(3, (f"Layer {layer.position}: ", Name(layer.title))))
        for wrt, value in layer.local:
            blocks.append(
                Equation("local partial derivative", (_partial(layer.element, wrt), EQ, value))
            )
        for g, value in layer.vjps:
            blocks.append(Equation("vector-Jacobian product", (_elem(g), EQ, value)))
        if layer.note:
            blocks.append(Para((layer.note,)))

    blocks.append(Heading(2, ("Chain rule for every parameter",)))
    blocks.append(
        Para(
            (
                "Reverse mode evaluates each product from the left, starting at the loss, as "
                "the vector-Jacobian products above: every factor is an op's compiled "
                "derivative.",
            )
        )
    )
    for _, pieces_ in nd.chains:
        blocks.append(Equation("", pieces_))
    return Document(tuple(blocks))


# -- public entry points -------------------------------------------------------------------

Explainable = Union[Derivation, TensorDerivation, NetworkDerivation, Document]  # noqa: UP007


def document(obj: Explainable) -> Document:
    """The :class:`Document` of a derivation (elementwise, tensor or network)."""
    if isinstance(obj, Document):
        return obj
    if isinstance(obj, Derivation):
        return _elementwise_document(obj)
    if isinstance(obj, TensorDerivation):
        return _tensor_document(obj)
    if isinstance(obj, NetworkDerivation):
        return _network_document(obj)
    raise ExplainError(
        f"cannot explain a {type(obj).__name__}: give op.derivation() or a network_derivation"
    )


def to_text(obj: Explainable) -> str:
    """Unicode text, for terminals; expressions in SymPy's syntax."""
    return _render_text(document(obj))


def to_latex(obj: Explainable) -> str:
    """LaTeX (amsmath): sections, prose, ``\\[ ... \\]`` display equations; ASCII only."""
    return _render_latex(document(obj))


def to_markdown(obj: Explainable) -> str:
    """GitHub-flavoured Markdown: inline math in ``$``, display math in ``$$``."""
    return _render_markdown(document(obj))


RENDERERS: dict[str, Callable[[Explainable], str]] = {
    "text": to_text,
    "latex": to_latex,
    "markdown": to_markdown,
}


def _filter_partials(d: Derivation | TensorDerivation, wrt: Sequence[str], what: str) -> Any:
    if not wrt:
        return d
    available = [
        p.wrt.name if isinstance(d, Derivation) else str(p.wrt.label)  # type: ignore[union-attr]
        for p in d.partials
    ]
    unknown = [w for w in wrt if w not in available]
    if unknown:
        raise DefinitionError(
            f"{what} has no input(s) {unknown} to differentiate with respect to; its inputs "
            f"are {available}"
        )
    by_name = dict(zip(available, d.partials, strict=True))
    chosen = tuple(by_name[name] for name in dict.fromkeys(wrt))
    return dataclasses.replace(d, partials=chosen)  # type: ignore[arg-type]


def derivation_for(
    target: str,
    wrt: Sequence[str] = (),
    params: Mapping[str, float] | None = None,
    name: str = "formula",
) -> Derivation | TensorDerivation:
    """The derivation of a built-in op (by name) or of a formula string, as compiled.

    A formula is parsed by :func:`symgrad.symbolic.parse.parse_formula` (no Python is
    evaluated); its inputs are ``wrt`` (in order), then its other symbols; ``params`` bind
    constants.  For a built-in, ``params`` are its parameters.  With ``wrt``, only those partial
    derivatives are kept.
    """
    from .api import builtin, elementwise
    from .builtins import BUILTINS, TENSOR_BUILTINS
    from .symbolic.parse import parse_formula

    params = dict(params or {})
    if target in BUILTINS or target in TENSOR_BUILTINS:
        options: dict[str, Any] = dict(params)  # the built-in's parameters, never ``wrt``
        op = builtin(target, **options)
        return _filter_partials(op.derivation(), wrt, f"built-in op {target!r}")  # type: ignore[arg-type]
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", target):
        names = ", ".join(sorted([*BUILTINS, *TENSOR_BUILTINS]))
        hint = did_you_mean(target, [*BUILTINS, *TENSOR_BUILTINS])
        raise DefinitionError(
            f"there is no built-in op {target!r}{hint}; built-ins are {names}. To derive a "
            "formula, write an expression such as 'x*tanh(softplus(x))'"
        )
    expr = parse_formula(target)
    symbols = {s.name: s for s in expr.free_symbols if isinstance(s, sp.Symbol)}
    missing = [w for w in wrt if w not in symbols]
    if missing:
        raise DefinitionError(
            f"--wrt {missing[0]}: the formula has no symbol {missing[0]!r}; its symbols are "
            f"{sorted(symbols)}"
        )
    constants = {k: v for k, v in params.items()}
    unknown = sorted(set(constants) - set(symbols))
    if unknown:
        raise DefinitionError(f"constant(s) {unknown} do not occur in the formula {target!r}")
    rest = sorted(n for n in symbols if n not in wrt and n not in constants)
    order = list(dict.fromkeys(wrt)) + rest
    if not order:
        raise DefinitionError(f"the formula {target!r} has no symbol to differentiate")
    op = elementwise(expr, inputs=[symbols[n] for n in order], name=name, constants=constants)
    return _filter_partials(op.derivation(), list(dict.fromkeys(wrt)), f"formula {target!r}")


# -- the documentation pages ---------------------------------------------------------------

_GENERATED = (
    "<!-- Generated by `python -m symgrad.explain --write docs/derivations` from the "
    "derivations symgrad compiles; do not edit. -->\n\n"
)


def article_derivation() -> NetworkDerivation:
    """§4.2 of the article: binary cross-entropy on ``p = σ(z)``, ``z = f_θ(x)`` linear.

    The loss is written as the article writes it, ``-y log p - (1 - y) log(1 - p)``, on
    probabilities; the model is ``Linear(3, 1)`` then ``Sigmoid``.  Training fuses the sigmoid
    into the loss, and the printout shows the two local factors and their product.
    """
    import numpy as np

    from .api import elementwise
    from .nn.losses import ElementwiseLoss
    from .nn.modules import Linear, Sequential, Sigmoid

    p, y = sp.symbols("p y", real=True)
    bce = elementwise(-y * sp.log(p) - (1 - y) * sp.log(1 - p), inputs=[p, y], name="article_bce")
    model = Sequential(Linear(3, 1, dtype=np.float64, rng=np.random.default_rng(0)), Sigmoid())
    return network_derivation(
        model,
        ElementwiseLoss(bce),
        names=("z", "p"),
        title="The article's §4.2: binary cross-entropy through a sigmoid",
    )


def finetune_derivation() -> NetworkDerivation:
    """The fine-tuning task's network (``make_mlp``: 64-128-64-10, tanh) with cross-entropy."""
    import numpy as np

    from .nn.losses import CrossEntropyLoss
    from .tasks.finetune import make_mlp

    model = make_mlp(np.dtype(np.float64), np.random.default_rng(0))
    return network_derivation(
        model,
        CrossEntropyLoss(),
        title="The fine-tuning network: 64-128-64-10 tanh MLP with cross-entropy",
    )


_ARTICLE_INTRO = """\
The worked example of §4.2 of the article symgrad grew from,
《从零开始大模型开发与微调：链式求导法则》 ("Developing and fine-tuning large models from
scratch: the chain rule"; not part of this repository): a model z = f_θ(x), here one linear
layer, its output squashed to a probability p = σ(z), and the binary cross-entropy
L = −y log p − (1 − y) log(1 − p). The article writes the two local factors as
∂L/∂p = −y/p + (1 − y)/(1 − p) and ∂p/∂z = p(1 − p), and their product as p − y. Below, symgrad
derives them: everything is generated from its derivations of those formulas (the loss as an
elementwise op on p, the sigmoid, the linear layer) and of the fused op it trains with — no
factor is typed in. The parameters θ are the weight W_1 and the bias c_1; ℓ is the loss of one
element and L the mean over the batch.
"""


def doc_pages() -> dict[str, str]:
    """Every page of ``docs/derivations``: file name → Markdown."""
    from .api import builtin
    from .builtins import BUILTINS, TENSOR_BUILTINS

    pages: dict[str, str] = {}
    index = [
        "# Derivation printouts",
        "",
        "Generated from the derivations symgrad compiles (`python -m symgrad.explain --write "
        "docs/derivations`; a test fails when they are out of date). Each page shows the "
        "forward formula, the stability rewrites, every local partial derivative, the chain "
        "rule, the Kronecker contraction (index notation) and the common subexpressions.",
        "",
        "The same printouts come from `op.derivation().to_markdown()` (also `.to_text()`, "
        "`.to_latex()`) and from the command line: `symgrad derive NAME` or "
        '`symgrad derive "x*tanh(softplus(x))" --wrt x --format markdown`.',
        "",
        "## Worked examples",
        "",
        "- [The article's §4.2: binary cross-entropy through a sigmoid](article_bce.md)",
        "- [The fine-tuning network (64-128-64-10 tanh MLP, cross-entropy)](finetune_mlp.md)",
        "",
        "## Elementwise ops",
        "",
    ]
    for name, entry in BUILTINS.items():
        pages[f"{name}.md"] = _GENERATED + to_markdown(builtin(name).derivation())
        index.append(f"- [`{name}`]({name}.md)" + (f" — {entry.doc}" if entry.doc else ""))
    index += ["", "## Tensor ops (index notation)", ""]
    for name, tentry in TENSOR_BUILTINS.items():
        pages[f"{name}.md"] = _GENERATED + to_markdown(builtin(name).derivation())
        index.append(f"- [`{name}`]({name}.md)" + (f" — {tentry.doc}" if tentry.doc else ""))
    pages["finetune_mlp.md"] = _GENERATED + to_markdown(finetune_derivation())
    article = to_markdown(article_derivation())
    head, _, rest = article.partition("\n\n")
    pages["article_bce.md"] = _GENERATED + head + "\n\n" + _ARTICLE_INTRO + "\n" + rest
    pages["README.md"] = _GENERATED + "\n".join(index) + "\n"
    return pages


def write_docs(directory: Path) -> list[Path]:
    """Write :func:`doc_pages` into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in doc_pages().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_docs(directory: Path) -> list[str]:
    """Names of the pages in ``directory`` that differ from :func:`doc_pages` (or are missing)."""
    stale = []
    for name, text in doc_pages().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m symgrad.explain --write DIR`` or ``--check DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m symgrad.explain", description="generate the derivation pages"
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="DIR", help="write every page into DIR")
    group.add_argument("--check", metavar="DIR", help="exit 1 if a page in DIR is out of date")
    args = parser.parse_args(argv)
    if args.write:
        written = write_docs(Path(args.write))
        print(f"wrote {len(written)} pages to {args.write}")
        return 0
    stale = stale_docs(Path(args.check))
    if stale:
        print(f"out of date in {args.check}: {', '.join(stale)}", file=sys.stderr)
        return 1
    print(f"{args.check} is up to date")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
