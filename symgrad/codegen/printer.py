"""The strict Numba printer: SymPy expression → Python/Numba source text.

One table, :data:`NUMBA_FUNCTIONS`, lists every SymPy function symgrad can compile and the
``math`` function it becomes; Python built-ins (``abs``, ``min``, ``max``) and ``Piecewise``
(ternaries) are printed by SymPy's :class:`PythonCodePrinter`.  Anything else is a
:class:`~symgrad.errors.CodegenError` naming the function — never a partially printed kernel.
Floats are printed with all 17 significant digits, so float64 constants survive exactly.

With ``vector_math=True`` the functions of :data:`VECTOR_FUNCTIONS` (``exp``, ``log``,
``log1p``, ``tanh``, ``erf``) print as calls of branch-free implementations
(:data:`VECTOR_MATH_SOURCE`) that the emitter places in the kernel module: a libm call stops LLVM
from vectorising a loop (Numba's SVML is not available here), an inlined polynomial does not.
They are within about one unit in the last place of the exact value, handle ±0, ±inf, NaN,
overflow, underflow and subnormal arguments and results, and use only IEEE arithmetic, selects
and bit casts — no fast-math but fused multiply-adds (``codegen/jit.py``), no branch, so an
argument far outside the range (an attention mask of -3.4e38) costs what any other does.
``tanh`` and ``erf`` take their exponential as a second argument (``exp(2|a|)``, ``exp(-a²)``,
see :func:`with_helper_arguments`): a helper calling another would be too large for LLVM to
inline, and CSE then shares it with the formula's own.

Kernels for float32 data (``dtype="float32"``) print float32 constants and call the float32
twins of :data:`SINGLE_PRECISION`, which vectorise 8 lanes wide on AVX2, not 4.

Measured in ``tests/test_vector_math.py`` (over a million points per helper and precision:
uniform over the range, normal, log-uniform magnitudes from the smallest subnormal, both signs,
around the range's ends) against the float64 reference (NumPy's, or glibc's ``erf``) — for the
float32 twins that reference rounded to float32, itself correctly rounded in practice:

=========  ===========================  =====================================================
helper     float64: max (mean) ulp      float32 twin: max (mean) ulp, NumPy's float32 beside it
=========  ===========================  =====================================================
``exp``    1.0 (0.08)                   0.99 (0.24); NumPy 2.36
``log``    1.0 (0.01)                   0.77 (0.25); NumPy 2.92
``log1p``  1.0 (0.00)                   0.80 (0.22); NumPy 0.80
``tanh``   1.0 (0.15)                   1.30 (0.21); NumPy 1.36
``erf``    1.0 (0.03) against glibc     1.25 (0.21)
=========  ===========================  =====================================================

Against mpmath (30 digits): ``_sg_erf`` at most 1.22 ulp on 220,000 points (mean 0.24; glibc's
``erf`` 0.88 there) — ``1 - exp(-x²)·t·h(t)`` above |x| = 1 rounds a few times in a quantity
damped by erfc(x) <= 0.16; ``_sg_log`` at most 0.81 ulp on 220,000 points (mean 0.14; glibc's
0.51); ``_sg_tanh`` at most 0.81 ulp on 1.2 million points (mean 0.21; glibc's ``tanh`` 2.14,
NumPy's 1.17).  ``erf``'s polynomials are fitted by ``tools/fit_erf.py`` (mpmath's Chebyshev
fits, 40 digits); ``log``/``log1p`` use fdlibm's reduction with Taylor coefficients; the
float32 ``exp`` Cephes' polynomial.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import log1p
from sympy.printing.codeprinter import PrintMethodNotImplementedError
from sympy.printing.precedence import precedence
from sympy.printing.pycode import PythonCodePrinter

from ..errors import CodegenError, UnsupportedFunctionError
from .jit import njit

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
        "Abs", "Max", "Min", "sign", "Heaviside", "Piecewise",
        "sigmoid", "softplus", "logcosh", "xlogy",
        "floor", "ceiling",  # of index expressions: a strided convolution's bounds
    }
    | {"_TanhWithExp", "_ErfWithExp"}  # printing forms (see with_helper_arguments)
)

#: SymPy function name → the vectorisable helper it prints as when ``vector_math`` is on
#: (``tanh(a)`` as ``_sg_tanh(a, _sg_exp(2.0*abs(a)))``).
VECTOR_FUNCTIONS: dict[str, str] = {
    "exp": "_sg_exp",
    "log": "_sg_log",
    "log1p": "_sg_log1p",
    "tanh": "_sg_tanh",
    "erf": "_sg_erf",
}

#: Numba source of each helper of :data:`VECTOR_FUNCTIONS` (needs ``math``, ``numpy as np`` and
#: ``njit`` in the module; the decorator line is added below).  No fast-math but one flag: the
#: helpers rely on exact IEEE rounding (the round-to-integer shift, Cody-Waite reduction, the
#: two-sum of ``1 + x``); as separate functions LLVM inlines them with their own flags, so a
#: fast-math kernel leaves them intact.  The flag lets a product and the sum consuming it become
#: one fused multiply-add (``codegen/jit.py``): every rounding they rely on is of a sum or of an
#: exact product, except in :data:`_EXACT_HELPERS`.
_HELPER_BODIES: dict[str, str] = {
    "_sg_exp": """\
def _sg_exp(v):
    # exp(v), branch-free.  v = k*ln2 + r with |r| <= ln2/2 (ln2 in two parts: k*ln2_hi is
    # exact); exp(r) = 1 + r + r*r*q(r), q the Taylor series up to r**11/13! (Estrin's scheme);
    # 2**k applied as two factors so that overflow and subnormal results round once.  Outside
    # (-746, 710) the result is 0 or inf: computed from d = 0 there and replaced, so that an
    # argument far into underflow (an attention mask of -3.4e38) costs what any other does.
    x = np.float64(v)
    inside = (x > -746.0) & (x < 710.0)
    d = x if inside else 0.0
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
    res = p * s1 * s2 if inside else (math.inf if x > 0.0 else 0.0)
    return res if x == x else x
""",
    "_sg_log1p": """\
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
def _sg_exp_f32(v):
    # exp(v) in float32 throughout (8 lanes per AVX2 vector, not 4): v = k*ln2 + r, ln2 in two
    # parts (Cody-Waite), exp(r) = 1 + r + r*r*P(r) with Cephes' expf polynomial (Estrin's
    # scheme: short dependency chains); 2**k as two factors, so overflow gives inf and tiny
    # results 0.  Outside (-104, 89) the result is 0 or inf, computed from d = 0 and replaced
    # (no slow path far into underflow); NaN passes through.
    x = np.float32(v)
    inside = (x > np.float32(-104.0)) & (x < np.float32(89.0))
    d = x if inside else np.float32(0.0)
    t = d * np.float32(1.4426950216293335) + np.float32(12582912.0)
    kf = t - np.float32(12582912.0)
    r = (d - kf * np.float32(0.693359375)) - kf * np.float32(-0.00021219444170128554)
    r2 = r * r
    r4 = r2 * r2
    p = (np.float32(0.50000001201E0) + r * np.float32(0.16666665673255920)) + r2 * (
        np.float32(0.04166579619050026) + r * np.float32(0.008333452045917511)
    )
    p = p + r4 * (np.float32(0.0013981999363750219) + r * np.float32(0.00019875691214110702))
    p = p * r2 + r + np.float32(1.0)
    k = np.float32(t).view(np.int32) - np.int32(1262485504)
    k1 = k >> 1
    s1 = np.int32((k1 + 127) << 23).view(np.float32)
    s2 = np.int32((k - k1 + 127) << 23).view(np.float32)
    res = p * s1 * s2 if inside else (np.float32(math.inf) if x > 0 else np.float32(0.0))
    return res if x == x else x
""",
    "_sg_tanh_f32": """\
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
    "_sg_erf": """\
def _sg_erf(v, e):
    # erf(v) given e = exp(-v*v) (the printer passes _sg_exp(-v*v): see with_helper_arguments).
    # Both forms computed, one selected.  |x| < 1: x + x*g(x*x), g(z) = erf(sqrt(z))/sqrt(z) - 1
    # as a polynomial of degree 12.  1 <= |x| < 6: 1 - e*t*h(t - 0.6), t = 1/|x|, h the degree-23
    # polynomial of x*exp(x*x)*erfc(x) in t (x*x is rounded, but erfc(x) <= 0.16 damps the
    # error); 1 above 6 (erf rounds to 1 from 5.93).  The sign by copysign: NaN -> NaN,
    # +-inf -> +-1, -0.0 kept.  Coefficients fitted by tools/fit_erf.py.
    x = np.float64(v)
    a = abs(x)
    z = x * x
    p = 5.957176147748911e-11 * z - 1.1372848856791674e-09
    p = p * z + 1.4659775274047436e-08
    p = p * z - 1.6350312701054695e-07
    p = p * z + 1.6461000484121368e-06
    p = p * z - 1.4925595266831182e-05
    p = p * z + 0.0001205533111164271
    p = p * z - 0.000854832698083379
    p = p * z + 0.0052239776248180145
    p = p * z - 0.026866170645076792
    p = p * z + 0.11283791670954879
    p = p * z - 0.3761263890318375
    p = p * z + 0.1283791670955126
    small = x + x * p
    t = 1.0 / a
    u = t - 0.6
    q = 0.7832189615190528 * u - 0.26333659765955403
    q = q * u - 0.6825594938578495
    q = q * u + 0.3451667759832657
    q = q * u + 0.06733066858413297
    q = q * u + 0.011325784774648361
    q = q * u - 0.04740586945956998
    q = q * u - 0.029495850431007477
    q = q * u + 0.07327350894387506
    q = q * u - 0.07634039408041603
    q = q * u + 0.060878810660172936
    q = q * u - 0.03165857095982911
    q = q * u - 0.004533666680946298
    q = q * u + 0.037236842354354684
    q = q * u - 0.05678242319666571
    q = q * u + 0.05652801729661679
    q = q * u - 0.03454443786049125
    q = q * u - 0.004958642072124591
    q = q * u + 0.05075075380253109
    q = q * u - 0.08431841700922565
    q = q * u + 0.080218812146252
    q = q * u - 0.00700264962413316
    q = q * u - 0.17138075875024392
    q = q * u + 0.4938124622820189
    big = 1.0 - (e * t) * q
    big = 1.0 if a >= 6.0 else big
    big = math.copysign(big, x)
    return small if a < 1.0 else big
""",
    "_sg_erf_f32": """\
def _sg_erf_f32(v, e):
    # erf(v) in float32 given e = exp(-v*v) (from _sg_exp_f32), the forms of _sg_erf with
    # polynomials of degree 7 (g) and 8 (h, in t - 0.6), fitted for float32 and evaluated by
    # Estrin's scheme (short dependency chains: the loop is latency-bound); 1 above 3.92 (erf
    # rounds to 1 in float32 from 3.919).
    x = np.float32(v)
    a = abs(x)
    z = x * x
    z2 = z * z
    p1_0 = (np.float32(0.12837916612625122) + z * np.float32(-0.37612637877464294)) + z2 * (
        np.float32(0.11283782124519348) + z * np.float32(-0.026865430176258087)
    )
    p1_1 = (np.float32(0.005221031606197357) + z * np.float32(-0.0008484080317430198)) + z2 * (
        np.float32(0.00011265958892181516) + z * np.float32(-9.667044650996104e-06)
    )
    z4 = z2 * z2
    p = (p1_0 + z4 * p1_1)
    small = x + x * p
    t = np.float32(1.0) / a
    u = t - np.float32(0.6)
    u2 = u * u
    q1_0 = (np.float32(0.4938124418258667) + u * np.float32(-0.17138025164604187)) + u2 * (
        np.float32(-0.006998246069997549) + u * np.float32(0.08016738295555115)
    )
    q1_1 = (np.float32(-0.0844971314072609) + u * np.float32(0.052202366292476654)) + u2 * (
        np.float32(-0.002878788858652115) + u * np.float32(-0.05008591338992119)
    )
    u4 = u2 * u2
    u8 = u4 * u4
    q = ((q1_0 + u4 * q1_1) + u8 * np.float32(0.05292610451579094))
    big = np.float32(1.0) - (np.float32(e) * t) * q
    big = np.float32(1.0) if a >= np.float32(3.92) else big
    big = math.copysign(big, x)
    return small if a < np.float32(1.0) else big
""",
    "_sg_log": """\
def _sg_log(v):
    # log(v), branch-free, as _sg_log1p without the rounding correction: x = 2**k * (1 + f)
    # with sqrt(2)/2 <= 1 + f < sqrt(2) (a subnormal x scaled by 2**54 first), log(1 + f) by
    # fdlibm's form; special values selected at the end (0 -> -inf, negative -> NaN).
    x = np.float64(v)
    sub = x < 2.2250738585072014e-308
    u = x * 18014398509481984.0 if sub else x
    bits = np.float64(u).view(np.int64)
    hu = (bits >> 32) + 614242
    k = (hu >> 20) - 1023 - (54 if sub else 0)
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
        (hfsq - (s * (hfsq + big_r) + kf * 1.9082149292705877e-10)) - f
    )
    res = x if x == math.inf else res
    res = -math.inf if x == 0.0 else res
    res = math.nan if x < 0.0 else res
    return res if x == x else x
""",
    "_sg_log_f32": """\
def _sg_log_f32(v):
    # log(v) in float32 throughout: _sg_log's method with float32 bit fields (a subnormal x
    # scaled by 2**25 first), R(z) the Taylor series of 2*atanh(s)/s - 2 up to s**8 and ln2 in
    # two parts (k*ln2_hi exact).
    x = np.float32(v)
    sub = x < np.float32(1.1754943508222875e-38)
    u = x * np.float32(33554432.0) if sub else x
    ix = np.float32(u).view(np.int32) + np.int32(4913933)
    k = (ix >> 23) - np.int32(127) - (np.int32(25) if sub else np.int32(0))
    ix = (ix & np.int32(8388607)) + np.int32(1060439283)
    f = np.int32(ix).view(np.float32) - np.float32(1.0)
    kf = np.float32(k)
    hfsq = np.float32(0.5) * f * f
    s = f / (np.float32(2.0) + f)
    z = s * s
    big_r = np.float32(0.2222222238779068) * z + np.float32(0.2857142984867096)
    big_r = big_r * z + np.float32(0.4000000059604645)
    big_r = big_r * z + np.float32(0.6666666865348816)
    big_r = big_r * z
    res = kf * np.float32(0.693145751953125) - (
        (hfsq - (s * (hfsq + big_r) + kf * np.float32(1.428606765330187e-06))) - f
    )
    res = x if x == np.float32(math.inf) else res
    res = np.float32(-math.inf) if x == np.float32(0.0) else res
    res = np.float32(math.nan) if x < np.float32(0.0) else res
    return res if x == x else x
""",
    "_sg_log1p_f32": """\
def _sg_log1p_f32(v):
    # log1p(v) in float32 throughout: _sg_log_f32 of u = 1 + v rounded, plus the rounding
    # error (1 + v) - u (exact by two-sum) over u, as _sg_log1p does in float64.
    x = np.float32(v)
    u = np.float32(1.0) + x
    ub = u - np.float32(1.0)
    c = ((np.float32(1.0) - (u - ub)) + (x - ub)) / u
    ix = np.float32(u).view(np.int32) + np.int32(4913933)
    k = (ix >> 23) - np.int32(127)
    ix = (ix & np.int32(8388607)) + np.int32(1060439283)
    f = np.int32(ix).view(np.float32) - np.float32(1.0)
    kf = np.float32(k)
    hfsq = np.float32(0.5) * f * f
    s = f / (np.float32(2.0) + f)
    z = s * s
    big_r = np.float32(0.2222222238779068) * z + np.float32(0.2857142984867096)
    big_r = big_r * z + np.float32(0.4000000059604645)
    big_r = big_r * z + np.float32(0.6666666865348816)
    big_r = big_r * z
    res = kf * np.float32(0.693145751953125) - (
        (hfsq - (s * (hfsq + big_r) + (kf * np.float32(1.428606765330187e-06) + c))) - f
    )
    res = x if abs(x) < np.float32(2.9802322387695312e-08) else res
    res = u if u == np.float32(math.inf) else res
    res = np.float32(-math.inf) if u == np.float32(0.0) else res
    res = np.float32(math.nan) if x < np.float32(-1.0) else res
    return res if x == x else x
""",
}

#: Helpers that must see every product rounded: the float64 ``tanh`` splits numbers (Veltkamp)
#: and forms Dekker's exact product, which a fused multiply-add would change.
_EXACT_HELPERS = frozenset({"_sg_tanh"})

VECTOR_MATH_SOURCE: dict[str, str] = {
    name: njit(contract=name not in _EXACT_HELPERS) + "\n" + body
    for name, body in _HELPER_BODIES.items()
}

#: The float32 twin of each helper, called by kernels for float32 data (the ``_f32`` functions
#: of a generated module, and the fused step of a float32 model): the float64 helpers convert
#: their argument to float64, which halves the lanes of a vectorised float32 loop.
SINGLE_PRECISION: dict[str, str] = {
    name: f"{name}_f32" for name in ("_sg_exp", "_sg_log", "_sg_log1p", "_sg_tanh", "_sg_erf")
}


class _WithExpBase(sp.Function):
    """``f(a)`` computed by a helper that takes ``e``, an exponential of ``a``, as its second
    argument (see :func:`with_helper_arguments`): ``e`` is an ordinary subexpression, printed
    as the exp helper and shared by CSE with any equal ``exp`` of the formula.  (The name ends
    in ``Base``: SymPy's printers look up a function's base classes only by such names.)"""

    nargs = 2
    helper = ""

    def _eval_derivative(self, s: sp.Symbol) -> sp.Expr:  # pragma: no cover - printing only
        raise TypeError(f"{type(self).__name__} is a printing form, not differentiable")


class _TanhWithExp(_WithExpBase):
    """``tanh(a)`` given ``exp(2|a|)``."""

    helper = "_sg_tanh"


class _ErfWithExp(_WithExpBase):
    """``erf(a)`` given ``exp(-a²)``."""

    helper = "_sg_erf"


def with_helper_arguments(expr: sp.Expr) -> sp.Expr:
    """``expr`` with ``tanh(a)`` → ``tanh(a, exp(2|a|))`` and ``erf(a)`` → ``erf(a, exp(-a²))``
    in the form their helpers take, so that CSE shares the exponential with the formula's own:
    GELU's derivative holds ``exp(-x²/2)``, the ``exp(-a²)`` of its ``erf(x/√2)``, and its
    ``value_and_vjp`` then computes one exponential per element, not two."""
    return expr.replace(
        lambda n: isinstance(n, (sp.tanh, sp.erf)),
        lambda n: _TanhWithExp(n.args[0], sp.exp(2 * sp.Abs(n.args[0])))
        if isinstance(n, sp.tanh)
        else _ErfWithExp(n.args[0], sp.exp(-n.args[0] ** 2)),  # type: ignore[arg-type]
    )


def nearest_float32(value: sp.Expr) -> float:
    """The float32 nearest to the exact real ``value`` (a number: ``1/3``, ``sqrt(2/pi)``...),
    as a Python float (exactly representable)."""
    exact = sp.Rational(value) if value.is_Rational else sp.Rational(value.evalf(40))
    with np.errstate(over="ignore"):  # beyond float32's range: ±inf, as IEEE rounds
        guess = np.float32(float(exact))
        down = np.nextafter(guess, np.float32(-np.inf))
        up = np.nextafter(guess, np.float32(np.inf))
    candidates = [guess, down, up]
    return float(min(candidates, key=lambda c: abs(sp.Rational(float(c)) - exact)))


def _integer_scaled(expr: sp.Expr) -> tuple[sp.Expr, int] | None:
    """``(n, d)`` with ``expr = n / d``, ``n`` a polynomial with integer coefficients in integer
    symbols and ``d`` a positive integer — an index expression SymPy wrote with fractions
    (``D/3 - 1/3``); None for anything else."""
    if expr.atoms(sp.Float) or expr.atoms(sp.Indexed) or not expr.is_polynomial():
        return None
    if not all(s.is_integer for s in expr.free_symbols):
        return None
    den = 1
    for r in expr.atoms(sp.Rational):
        den = int(sp.ilcm(den, r.q))
    return sp.expand(expr * den), den


class _ExactRounding(PythonCodePrinter):
    """floor and ceiling of an index expression SymPy wrote with fractions in integer
    arithmetic (:func:`_integer_scaled`: ``floor(D/3 - 1/3)`` as ``(D - 1) // 3``; in floats
    it is 1 at D = 7); of anything else, ``math.floor``/``math.ceil``."""

    def _print_floor(self, expr: sp.Expr) -> str:
        return self._rounded(expr.args[0], "floor")

    def _print_ceiling(self, expr: sp.Expr) -> str:
        return self._rounded(expr.args[0], "ceil")

    def _rounded(self, arg: sp.Expr, how: str) -> str:
        scaled = _integer_scaled(arg)
        if scaled is None:
            return f"math.{how}({self._print(arg)})"
        num, den = self._print_integer(scaled[0]), scaled[1]
        return f"(({num}) // {den})" if how == "floor" else f"(-((-({num})) // {den}))"

    def _print_integer(self, expr: sp.Expr) -> str:
        """``expr``, an integer expression, as integer arithmetic."""
        return str(self._print(expr))


class _IndexCodePrinter(_ExactRounding):
    """Loop bounds and index arithmetic: Python's printer, floor and ceiling exact."""


def index_code(expr: sp.Expr) -> str:
    """Python source of an integer index expression (a loop bound): exact for the fractions
    SymPy writes in bounds (``floor(D/3 - 1/3)`` is ``(D - 1) // 3``, not a float floor that
    gives 1 at D = 7)."""
    return str(_IndexCodePrinter({"fully_qualified_modules": True}).doprint(sp.sympify(expr)))


class NumbaPrinter(_ExactRounding):
    """``PythonCodePrinter`` restricted to :data:`NUMBA_FUNCTIONS`, strict, exact floats.

    ``dtype="float32"`` prints for float32 data: every constant as a float32 (``np.float32(
    0.5)``; a numeric subexpression such as ``sqrt(2/pi)`` as one constant, the float32
    nearest to its exact value), integer symbols (dims, loop indices) converted where they
    enter arithmetic, and the float32 helpers — a float64 constant would turn the whole loop
    into float64 arithmetic (Numba types ``x*0.5`` as float64 for a float32 ``x``).
    """

    # PythonCodePrinter looks functions up in this table; we replace it with ours.
    _kf: ClassVar[dict[str, str]] = {
        name: f"math.{target}" for name, target in NUMBA_FUNCTIONS.items()
    }

    def __init__(self, vector_math: bool = False, dtype: str = "float64") -> None:
        super().__init__({"strict": True, "fully_qualified_modules": True})
        self.known_functions = {
            **self._kf, "Abs": "abs", "Max": "max", "Min": "min",
        }
        self._vector_math = vector_math
        self._single = dtype == "float32"
        self._integer_context = False  # inside a comparison of integers: no conversion
        if vector_math:
            self.known_functions.update(
                {name: self._helper(h) for name, h in VECTOR_FUNCTIONS.items()}
            )

    def _helper(self, name: str) -> str:
        return SINGLE_PRECISION[name] if self._single else name

    # -- functions -------------------------------------------------------------------------

    def _print_tanh(self, expr: sp.Expr) -> str:
        if not self._vector_math:
            return str(super()._print_tanh(expr))
        return self._print(with_helper_arguments(expr))

    def _print_erf(self, expr: sp.Expr) -> str:
        if not self._vector_math:
            return str(super()._print_erf(expr))
        return self._print(with_helper_arguments(expr))

    def _print__WithExpBase(self, expr: _WithExpBase) -> str:
        if not self._vector_math:
            raise CodegenError(f"{expr.helper} needs the vectorisable helpers")
        arg, e = (self._print(a) for a in expr.args)
        return f"{self._helper(expr.helper)}({arg}, {e})"

    def _print_sign(self, expr: sp.Expr) -> str:
        arg = self._print(expr.args[0])
        zero, one = self._number(0.0), self._number(1.0)
        return f"({zero} if {arg} == 0 else math.copysign({one}, {arg}))"

    # -- numbers ---------------------------------------------------------------------------

    def _number(self, value: float) -> str:
        """A float constant: exact float64 text, or the float32 ``value`` as ``np.float32``."""
        return f"np.float32({value!r})" if self._single else repr(value)

    def _print(self, expr: object, **kwargs: object) -> str:
        if (
            self._single
            and isinstance(expr, sp.Expr)
            and not isinstance(expr, (sp.Integer, sp.Rational, sp.Float))
            and expr.is_number
            and expr.is_extended_real
            and expr.is_finite
        ):
            # sqrt(2)/sqrt(pi) as one float32 constant, rounded once from its exact value
            return self._number(nearest_float32(expr))
        return str(super()._print(expr, **kwargs))

    def _print_Float(self, expr: sp.Float) -> str:
        if self._single:
            with np.errstate(over="ignore"):  # beyond float32's range: ±inf, as IEEE rounds
                return self._number(float(np.float32(float(expr))))
        return repr(float(expr))

    def _print_Rational(self, expr: sp.Rational) -> str:
        if self._single:
            return self._number(nearest_float32(expr))
        return f"({expr.p}/{expr.q})"

    def _print_Half(self, expr: sp.Rational) -> str:
        return self._number(0.5)

    def _print_Integer(self, expr: sp.Integer) -> str:
        if self._integer_context:
            return str(int(expr))
        return self._number(float(int(expr)))

    def _print_Infinity(self, expr: sp.Expr) -> str:
        return "np.float32(math.inf)" if self._single else "math.inf"

    def _print_NegativeInfinity(self, expr: sp.Expr) -> str:
        return "np.float32(-math.inf)" if self._single else "-math.inf"

    def _print_NaN(self, expr: sp.Expr) -> str:
        return "np.float32(math.nan)" if self._single else "math.nan"

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        name = str(super()._print_Symbol(expr))
        if self._single and expr.is_integer and not self._integer_context:
            return f"np.float32({name})"  # a dim or loop index entering float arithmetic
        return name

    def _print_Relational(self, expr: sp.Expr) -> str:
        scaled = _integer_scaled(expr.lhs - expr.rhs)
        if scaled is not None and scaled[1] != 1:  # i <= D/3 - 1/3 as 3*i <= D - 1: exact
            den = scaled[1]
            lhs, rhs = sp.expand(expr.lhs * den), sp.expand(expr.rhs * den)
            expr = expr.func(lhs, rhs, evaluate=False)
        integers = bool(expr.lhs.is_integer and expr.rhs.is_integer)
        outer, self._integer_context = self._integer_context, integers or self._integer_context
        try:
            return str(super()._print_Relational(expr))
        finally:
            self._integer_context = outer

    def _print_integer(self, expr: sp.Expr) -> str:
        outer, self._integer_context = self._integer_context, True  # no float32 conversions
        try:
            return str(self._print(expr))
        finally:
            self._integer_context = outer

    # -- arithmetic ------------------------------------------------------------------------

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

    def _print_Mul(self, expr: sp.Mul) -> str:
        if self._single:
            numeric = [a for a in expr.args if a.is_number]
            if len(numeric) > 1 or (numeric and not numeric[0].is_Rational):
                # 2/sqrt(pi)·x: the numeric factors as one float32 constant, rounded once
                coeff = sp.Mul(*numeric)
                rest = sp.Mul(*[a for a in expr.args if not a.is_number])
                if coeff.is_extended_real and coeff.is_finite:
                    factor = self.parenthesize(rest, precedence(expr))
                    return f"{self._number(nearest_float32(coeff))}*{factor}"
        return str(super()._print_Mul(expr))

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        base, exp = expr.as_base_exp()
        one = self._number(1.0)
        if exp.is_Integer and abs(int(exp)) <= 4:
            # Small integer powers as products: exact, and faster than pow() in a loop.
            n = abs(int(exp))
            factor = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Mul"] + 1)
            product = "*".join([factor] * n)
            return f"({one}/({product}))" if exp < 0 else f"({product})"
        if self._single:
            if exp == sp.S.Half:
                return f"math.sqrt({self._print(base)})"
            if exp == -sp.S.Half:
                return f"({one}/math.sqrt({self._print(base)}))"
            power = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Pow"] + 1)
            return f"{power}**({self._print(exp)})"
        return super()._print_Pow(expr, rational=rational)

    def _print_Heaviside(self, expr: sp.Expr) -> str:
        # Printed directly: SymPy's fallback rewrites it to a Piecewise first, which folds and
        # re-simplifies the argument (seconds for a derivative of a nested Max).  Same values
        # as that Piecewise: 0 below, H(0) at 0 (1/2 by default), 1 above and for NaN.
        arg = self._print(expr.args[0])
        at_zero = self._print(expr.args[1] if len(expr.args) > 1 else sp.S.Half)
        return f"((0.0) if ({arg}) < 0.0 else ({at_zero}) if ({arg}) == 0.0 else (1.0))"

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


def print_expr(
    expr: sp.Expr, op: str, vector_math: bool = False, dtype: str = "float64"
) -> str:
    """Numba source for ``expr``; a :class:`CodegenError` if anything cannot be printed.

    ``vector_math`` prints the functions of :data:`VECTOR_FUNCTIONS` as their helpers;
    ``dtype="float32"`` prints for float32 data (see :class:`NumbaPrinter`).
    """
    bad = unsupported_functions(expr)
    if bad:
        raise CodegenError(f"op {op!r}: cannot generate code for {', '.join(bad)} in {expr}")
    try:
        return NumbaPrinter(vector_math, dtype).doprint(expr)
    except PrintMethodNotImplementedError as err:
        raise CodegenError(f"op {op!r}: cannot generate code for {expr}: {err}") from err
