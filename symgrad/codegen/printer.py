"""The strict Numba printer: SymPy expression → Python/Numba source text.

One table, :data:`NUMBA_FUNCTIONS`, lists every SymPy function symgrad can compile and the
``math`` function it becomes; Python built-ins (``abs``, ``min``, ``max``) and ``Piecewise``
(ternaries) are printed by SymPy's :class:`PythonCodePrinter`.  Anything else is a
:class:`~symgrad.errors.CodegenError` naming the function — never a partially printed kernel.
Floats are printed with all 17 significant digits, so float64 constants survive exactly.

With ``vector_math=True`` the functions of :data:`VECTOR_FUNCTIONS` print as calls of
branch-free implementations (:data:`VECTOR_MATH_SOURCE`) that the emitter places in the kernel
module: a libm call stops LLVM from vectorising a loop (Numba's SVML is not available here), an
inlined polynomial does not.  They are within one unit in the last place of the libm functions
(checked against glibc and mpmath; ``tanh`` of the exact value, glibc's being 2 ulp off), handle
±inf, NaN, overflow and subnormal results, and use only IEEE arithmetic and bit casts — no
fast-math.

``_sg_tanh`` against mpmath on 1.2 million points (log-uniform magnitudes from subnormal to 30,
uniform on [-1, 1], [-2, 2], [-20, 20] and around the 0.625 switch): at most 0.81 ulp in float64
(mean 0.21; glibc's ``tanh`` 2.14, NumPy's 1.17 on the same points), differing from glibc by at
most 2 ulp.  A float32 kernel computes it in float64 and rounds once: every float32 result of the
same points was the correctly rounded one (NumPy's float32 ``tanh``: up to 1.36 ulp).  -0.0, ±inf
(±1) and NaN are exact.

Kernels generated for float32 data only (the fused training step of a float32 model) call the
float32 twins of :data:`SINGLE_PRECISION` instead, which vectorise 8 lanes wide on AVX2, not 4:
against float64 NumPy on 1.2 million float32 points (uniform over exp's whole range, normal,
log-uniform from 1e-38, and around tanh's 0.625 switch), ``_sg_exp_f32`` is within 0.97 ulp
(NumPy's float32 ``exp``: 2.36) and ``_sg_tanh_f32`` within 1.32 ulp (NumPy's: 1.37); -0.0,
±inf, NaN, overflow and underflow as libm.  Measured in ``tests/test_vector_math.py``.
"""

from __future__ import annotations

from typing import ClassVar

import sympy as sp
from sympy.codegen.cfunctions import log1p
from sympy.printing.codeprinter import PrintMethodNotImplementedError
from sympy.printing.precedence import precedence
from sympy.printing.pycode import PythonCodePrinter

from ..errors import CodegenError, UnsupportedFunctionError

#: SymPy function name → name in Python's ``math`` module, which Numba compiles natively.
NUMBA_FUNCTIONS: dict[str, str] = {
    "exp": "exp",
    "log": "log",
    "log1p": "log1p",
    "expm1": "expm1",
    "sqrt": "sqrt",
    "sin": "sin",
    "cos": "cos",
    "tan": "tan",
    "asin": "asin",
    "acos": "acos",
    "atan": "atan",
    "atan2": "atan2",
    "sinh": "sinh",
    "cosh": "cosh",
    "tanh": "tanh",
    "asinh": "asinh",
    "acosh": "acosh",
    "atanh": "atanh",
    "erf": "erf",
    "erfc": "erfc",
}

#: Functions the printer handles without the math module, and symgrad's own primitives (which
#: the emitter lowers to the functions above before printing).
STRUCTURAL = frozenset(
    {
        "Abs", "Max", "Min", "sign", "Heaviside", "Piecewise", "sigmoid", "softplus", "xlogy",
        "floor", "ceiling",  # of index expressions: a strided convolution's bounds
    }
)

#: SymPy function name → the vectorisable helper it prints as when ``vector_math`` is on
#: (``tanh(a)`` as ``_sg_tanh(a, _sg_exp(2.0*abs(a)))``).
VECTOR_FUNCTIONS: dict[str, str] = {"exp": "_sg_exp", "log1p": "_sg_log1p", "tanh": "_sg_tanh"}

#: Numba source of each helper of :data:`VECTOR_FUNCTIONS` (needs ``math``, ``numpy as np`` and
#: ``njit`` in the module).  Never fast-math: the helpers rely on exact IEEE rounding (the
#: round-to-integer shift, Cody-Waite reduction, the two-sum of ``1 + x``); as separate functions
#: LLVM inlines them with their own flags, so a fast-math kernel leaves them intact.
VECTOR_MATH_SOURCE: dict[str, str] = {
    "_sg_exp": """\
@njit(cache=True, error_model='numpy', fastmath=False)
def _sg_exp(v):
    # exp(v), branch-free.  v = k*ln2 + r with |r| <= ln2/2 (ln2 in two parts: k*ln2_hi is
    # exact); exp(r) = 1 + r + r*r*q(r), q the Taylor series up to r**11/13! (Estrin's scheme);
    # 2**k applied as two factors so that overflow and subnormal results round once.
    x = np.float64(v)
    d = min(max(x, -746.0), 710.0)
    t = d * 1.4426950408889634 + 6755399441055744.0
    kf = t - 6755399441055744.0
    rhi = d - kf * 0.6931471803691238
    rlo = -(kf * 1.9082149292705877e-10)
    r = rhi + rlo
    r2 = r * r
    r4 = r2 * r2
    a0 = 0.5 + r * 0.16666666666666666
    a1 = 0.041666666666666664 + r * 0.008333333333333333
    a2 = 0.001388888888888889 + r * 0.0001984126984126984
    a3 = 2.48015873015873e-05 + r * 2.7557319223985893e-06
    a4 = 2.755731922398589e-07 + r * 2.505210838544172e-08
    a5 = 2.08767569878681e-09 + r * 1.6059043836821613e-10
    q = (a0 + r2 * a1) + r4 * ((a2 + r2 * a3) + r4 * (a4 + r2 * a5))
    p = 1.0 + (rhi + (rlo + r2 * q))
    k = np.float64(t).view(np.int64) - 4843621399236968448
    k1 = k >> 1
    s1 = np.int64((k1 + 1023) << 52).view(np.float64)
    s2 = np.int64((k - k1 + 1023) << 52).view(np.float64)
    return p * s1 * s2 if x == x else x
""",
    "_sg_log1p": """\
@njit(cache=True, error_model='numpy', fastmath=False)
def _sg_log1p(v):
    # log1p(v), branch-free.  u = 1 + v rounded; its rounding error (1 + v) - u, exact by
    # two-sum, enters as c = error/u;
    # u = 2**k * (1 + f) with sqrt(2)/2 <= 1 + f < sqrt(2); log(1 + f) = 2*atanh(s),
    # s = f/(2 + f), as f - (f*f/2 - s*(f*f/2 + R(s*s))) (fdlibm's form, R the Taylor series
    # of 2*atanh(s)/s - 2 up to s**20, Estrin's scheme); special values selected at the end.
    x = np.float64(v)
    u = 1.0 + x
    ub = u - 1.0
    c = ((1.0 - (u - ub)) + (x - ub)) / u
    bits = np.float64(u).view(np.int64)
    hu = (bits >> 32) + 614242
    k = (hu >> 20) - 1023
    hu = (hu & 1048575) + 1072079006
    f = np.int64((hu << 32) | (bits & 4294967295)).view(np.float64) - 1.0
    kf = np.float64(np.int32(k))
    hfsq = 0.5 * f * f
    s = f / (2.0 + f)
    z = s * s
    z2 = z * z
    z4 = z2 * z2
    a0 = 0.6666666666666666 + z * 0.4
    a1 = 0.2857142857142857 + z * 0.2222222222222222
    a2 = 0.18181818181818182 + z * 0.15384615384615385
    a3 = 0.13333333333333333 + z * 0.11764705882352941
    a4 = 0.10526315789473684 + z * 0.09523809523809523
    big_r = z * ((a0 + z2 * a1) + z4 * ((a2 + z2 * a3) + z4 * a4))
    res = kf * 0.6931471803691238 - (
        (hfsq - (s * (hfsq + big_r) + (kf * 1.9082149292705877e-10 + c))) - f
    )
    res = x if abs(x) < 5.551115123125783e-17 else res
    res = u if u == math.inf else res
    res = -math.inf if u == 0.0 else res
    res = math.nan if x < -1.0 else res
    return res if x == x else x
""",
    "_sg_tanh": """\
@njit(cache=True, error_model='numpy', fastmath=False)
def _sg_tanh(v, e):
    # tanh(v) given e = exp(2|v|): the printer passes _sg_exp(2.0*abs(v)) (a helper calling
    # the other would be too large for LLVM to inline, and the loop would not vectorise).
    # Both forms computed, one selected.  |x| < 0.625: Cephes' rational form x + x*z*P(z)/Q(z),
    # z = x*x (x itself below 2**-28, which keeps -0.0).  Otherwise 1 - d, d = 2/(e + 1), with
    # e + 1 by Fast2Sum, the residual 2 - d*(e + 1) by Dekker's exact product (Veltkamp
    # splits) and 1 - d by Fast2Sum: the only rounding left is the last one, plus exp's error
    # damped by 2e/(e + 1)**2 <= 0.35.  1 above |x| = 20 (tanh rounds to 1 from 19.07, and e
    # may be inf there); the sign by copysign, so NaN -> NaN, +-inf -> +-1.
    x = np.float64(v)
    a = abs(x)
    z = x * x
    p = (-0.9643991794250523 * z - 99.28772310019185) * z - 1614.6876844170845
    q = ((z + 112.81167849163293) * z + 2235.4883906010045) * z + 4844.063053251255
    small = x + x * (z * p / q)
    small = x if a < 3.725290298461914e-09 else small
    s = e + 1.0
    se = 1.0 - (s - e)
    d = 2.0 / s
    c = 134217729.0 * d
    dh = c - (c - d)
    dl = d - dh
    c = 134217729.0 * s
    sh = c - (c - s)
    sl = s - sh
    ph = d * s
    pl = ((dh * sh - ph) + dh * sl + dl * sh) + dl * sl
    dc = (((2.0 - ph) - pl) - d * se) / s
    t = 1.0 - d
    big = t + (((1.0 - t) - d) - dc)
    big = 1.0 if a > 20.0 else big
    big = math.copysign(big, x)
    return small if a < 0.625 else big
""",
    "_sg_exp_f32": """\
@njit(cache=True, error_model='numpy', fastmath=False)
def _sg_exp_f32(v):
    # exp(v) in float32 throughout (8 lanes per AVX2 vector, not 4): v = k*ln2 + r, ln2 in two
    # parts (Cody-Waite), exp(r) = 1 + r + r*r*P(r) with Cephes' expf polynomial; 2**k as two
    # factors, so overflow gives inf and tiny results 0.  NaN passes through.
    x = np.float32(v)
    d = min(max(x, np.float32(-104.0)), np.float32(89.0))
    t = d * np.float32(1.4426950216293335) + np.float32(12582912.0)
    kf = t - np.float32(12582912.0)
    r = (d - kf * np.float32(0.693359375)) - kf * np.float32(-0.00021219444170128554)
    p = np.float32(0.00019875691214110702) * r + np.float32(0.0013981999363750219)
    p = p * r + np.float32(0.008333452045917511)
    p = p * r + np.float32(0.04166579619050026)
    p = p * r + np.float32(0.16666665673255920)
    p = p * r + np.float32(0.50000001201E0)
    p = p * (r * r) + r + np.float32(1.0)
    k = np.float32(t).view(np.int32) - np.int32(1262485504)
    k1 = k >> 1
    s1 = np.int32((k1 + 127) << 23).view(np.float32)
    s2 = np.int32((k - k1 + 127) << 23).view(np.float32)
    return p * s1 * s2 if x == x else x
""",
    "_sg_tanh_f32": """\
@njit(cache=True, error_model='numpy', fastmath=False)
def _sg_tanh_f32(v, e):
    # tanh(v) in float32 given e = exp(2|v|) (from _sg_exp_f32).  |x| < 0.625: Cephes' tanhf
    # polynomial x + x*z*P(z), z = x*x (x itself below 2**-12); otherwise 1 - 2/(e + 1), and 1
    # above |x| = 9.5 (tanh rounds to 1 in float32 from 8.7); the sign by copysign, so
    # NaN -> NaN, +-inf -> +-1.
    x = np.float32(v)
    a = abs(x)
    z = x * x
    p = np.float32(-0.00570498872745) * z + np.float32(0.0206390887954)
    p = p * z - np.float32(0.0537397155531)
    p = p * z + np.float32(0.133314422036)
    p = p * z - np.float32(0.333332819422)
    small = x + x * z * p
    small = x if a < np.float32(0.000244140625) else small  # x below 2**-12: keeps -0.0
    big = np.float32(1.0) - np.float32(2.0) / (np.float32(e) + np.float32(1.0))
    big = np.float32(1.0) if a > np.float32(9.5) else big
    big = math.copysign(big, x)
    return small if a < np.float32(0.625) else big
""",
}

#: The float32 twin of a helper, used in kernels generated for float32 data only (the fused
#: training step of a float32 model): the float64 helpers convert their argument to float64,
#: which halves the lanes of a vectorised float32 loop.
SINGLE_PRECISION: dict[str, str] = {"_sg_exp": "_sg_exp_f32", "_sg_tanh": "_sg_tanh_f32"}


class NumbaPrinter(PythonCodePrinter):
    """``PythonCodePrinter`` restricted to :data:`NUMBA_FUNCTIONS`, strict, exact floats."""

    # PythonCodePrinter looks functions up in this table; we replace it with ours.
    _kf: ClassVar[dict[str, str]] = {
        name: f"math.{target}" for name, target in NUMBA_FUNCTIONS.items()
    }

    def __init__(self, vector_math: bool = False) -> None:
        super().__init__({"strict": True, "fully_qualified_modules": True})
        self.known_functions = {
            **self._kf, "Abs": "abs", "Max": "max", "Min": "min",
            "floor": "math.floor", "ceiling": "math.ceil",
        }
        self._vector_math = vector_math
        if vector_math:
            self.known_functions.update(VECTOR_FUNCTIONS)

    def _print_tanh(self, expr: sp.Expr) -> str:
        if not self._vector_math:
            return str(super()._print_tanh(expr))
        arg = self._print(expr.args[0])
        return f"_sg_tanh({arg}, _sg_exp(2.0*abs({arg})))"

    def _print_Add(self, expr: sp.Add, order: str | None = None) -> str:
        # A bounded correction term — log1p(...), at most ln 2 in the stable forms — is added
        # last: in softplus(x) - x·y = (max(x, 0) - x·y) + log1p(exp(-|x|)) the large terms
        # cancel exactly first, and the small one keeps all its digits (Python adds left to
        # right).
        terms = list(expr.args)
        small = [t for t in terms if t.has(log1p)]
        if not small or len(small) == len(terms):
            return str(super()._print_Add(expr, order))
        large = sp.Add(*[t for t in terms if not t.has(log1p)])
        text = f"({self._print(large)})"
        for t in small:
            if t.as_coeff_Mul()[0].is_negative:
                text += f" - {self.parenthesize(-t, precedence(expr))}"
            else:
                text += f" + {self.parenthesize(t, precedence(expr))}"
        return text

    def _print_Float(self, expr: sp.Float) -> str:
        return repr(float(expr))

    def _print_Rational(self, expr: sp.Rational) -> str:
        return f"({expr.p}/{expr.q})"

    def _print_Half(self, expr: sp.Rational) -> str:
        return "0.5"

    def _print_Integer(self, expr: sp.Integer) -> str:
        return f"{int(expr)}.0"

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        base, exp = expr.as_base_exp()
        if exp.is_Integer and abs(int(exp)) <= 4:
            # Small integer powers as products: exact, and faster than pow() in a loop.
            n = abs(int(exp))
            factor = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Mul"] + 1)
            product = "*".join([factor] * n)
            return f"(1.0/({product}))" if exp < 0 else f"({product})"
        return super()._print_Pow(expr, rational=rational)

    def _print_ImaginaryUnit(self, expr: sp.Expr) -> str:
        raise CodegenError("the expression is complex (contains I): symgrad computes in reals")


def unsupported_functions(expr: sp.Basic) -> list[str]:
    """Names of the functions in ``expr`` that symgrad cannot compile, sorted."""
    names = set()
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.Function, sp.Piecewise)) or type(node).__name__ in ("Abs",):
            name = type(node).__name__
            if name not in NUMBA_FUNCTIONS and name not in STRUCTURAL:
                undefined = isinstance(node, sp.core.function.AppliedUndef)
                names.add(str(node.func) if undefined else name)
    return sorted(names)


def check_supported(expr: sp.Basic, op: str, what: str = "the formula") -> None:
    """Raise :class:`UnsupportedFunctionError` if ``expr`` uses a function we cannot compile."""
    bad = unsupported_functions(expr)
    if bad:
        raise UnsupportedFunctionError(
            f"op {op!r}: {what} uses {', '.join(bad)}, which symgrad cannot differentiate and "
            f"compile. Supported functions: {', '.join(sorted(NUMBA_FUNCTIONS))}, "
            "Abs, Max, Min, sign, Heaviside, Piecewise"
        )


def print_expr(expr: sp.Expr, op: str, vector_math: bool = False) -> str:
    """Numba source for ``expr``; a :class:`CodegenError` if anything cannot be printed.

    ``vector_math`` prints the functions of :data:`VECTOR_FUNCTIONS` as their helpers.
    """
    bad = unsupported_functions(expr)
    if bad:
        raise CodegenError(f"op {op!r}: cannot generate code for {', '.join(bad)} in {expr}")
    try:
        return NumbaPrinter(vector_math).doprint(expr)
    except PrintMethodNotImplementedError as err:
        raise CodegenError(f"op {op!r}: cannot generate code for {expr}: {err}") from err
