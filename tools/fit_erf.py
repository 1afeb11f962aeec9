"""Fit the polynomials of symgrad's vectorisable ``erf`` helpers (run: ``python tools/fit_erf.py``).

``erf(x) = x + x·g(x²)`` for ``|x| < 1`` and ``erf(x) = 1 − exp(−x²)·t·h(t − c)``, ``t = 1/|x|``,
for ``1 ≤ |x| < X`` (``X`` = 6 in float64, 3.92 in float32, above which erf rounds to 1), with

    g(z) = erf(√z)/√z − 1        h(t) = x·erfc(x)·exp(x²) at x = 1/t

both smooth (``g`` and ``x·exp(x²)·erfc(x)`` are entire), fitted by near-minimax Chebyshev
interpolation at 40 digits (``mpmath.chebyfit``); ``h`` is expanded about ``c`` so that its
coefficients stay small (no cancellation in Horner's scheme).  Prints the coefficients, highest
degree first, as they appear in ``symgrad/codegen/printer.py``, and the fits' errors.
"""

from __future__ import annotations

import mpmath as mp

mp.mp.dps = 40

#: precision → (terms of g, terms of h, X, c)
PLANS = {"float64": (13, 24, 6.0, 0.6), "float32": (8, 9, 3.92, 0.6)}


def g(z: mp.mpf) -> mp.mpf:
    if z == 0:
        return 2 / mp.sqrt(mp.pi) - 1
    x = mp.sqrt(z)
    return mp.erf(x) / x - 1


def h(t: mp.mpf) -> mp.mpf:
    x = 1 / t
    return x * mp.erfc(x) * mp.exp(x * x)


def fit(precision: str) -> tuple[list[float], list[float], float, float]:
    n_g, n_h, top, c = PLANS[precision]
    g_coeffs, g_err = mp.chebyfit(g, [0, 1], n_g, error=True)
    h_coeffs, h_err = mp.chebyfit(lambda u: h(u + c), [1 / mp.mpf(top) - c, 1 - c], n_h, error=True)
    print(f"# {precision}: |g error| {mp.nstr(g_err, 3)}, |h error| {mp.nstr(h_err, 3)}")
    return [float(v) for v in g_coeffs], [float(v) for v in h_coeffs], float(g_err), float(h_err)


if __name__ == "__main__":
    for precision in PLANS:
        gs, hs, _, _ = fit(precision)
        print("g =", gs)
        print("h =", hs)
