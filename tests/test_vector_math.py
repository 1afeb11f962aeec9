"""The vectorisable math helpers the emitter inlines, against float64 references.

The float64 helpers are within 1 ulp of the float64 reference (NumPy's, itself within about
1 ulp of the exact value); the float32 twins used by float32 fused steps within 1.5 ulp of the
float64 reference rounded to float32.  Special values (±0, ±inf, NaN, overflow, underflow) as
libm.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from numba import njit

from symgrad.codegen.printer import SINGLE_PRECISION, VECTOR_MATH_SOURCE


@pytest.fixture(scope="module")
def helpers() -> dict[str, Callable[..., float]]:
    namespace: dict[str, object] = {"math": math, "np": np, "njit": njit}
    for source in VECTOR_MATH_SOURCE.values():
        # not into the kernel cache: these are compiled once per test session
        exec(source.replace("cache=True", "cache=False"), namespace)
    return {name: namespace[name] for name in VECTOR_MATH_SOURCE}  # type: ignore[misc]


def _apply(helpers: dict[str, Callable[..., float]], name: str, x: np.ndarray) -> np.ndarray:
    """``name`` over ``x`` in a Numba loop, as a kernel calls it (tanh given exp(2|x|))."""
    f = helpers[name]
    if name.startswith("_sg_tanh"):
        exp = helpers["_sg_exp_f32" if name.endswith("f32") else "_sg_exp"]

        @njit
        def loop(a: np.ndarray, out: np.ndarray) -> None:
            for i in range(a.size):
                out[i] = f(a[i], exp(2.0 * abs(a[i])))
    else:

        @njit
        def loop(a: np.ndarray, out: np.ndarray) -> None:
            for i in range(a.size):
                out[i] = f(a[i])

    out = np.empty_like(x)
    loop(x, out)
    return out


def _points(dtype: type, low: float, high: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    tiny = np.geomspace(np.finfo(dtype).tiny, 1.0, 20_000) * rng.choice([-1, 1], 20_000)
    return np.concatenate(
        [rng.uniform(low, high, 60_000), rng.normal(size=20_000) * 3, tiny]
    ).astype(dtype)


def _ulps(got: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|got − reference| in units of the last place of ``reference`` rounded to got's dtype."""
    finite = np.isfinite(reference) & (np.abs(reference) < np.finfo(got.dtype).max)
    ref = reference[finite]
    spacing = np.spacing(np.abs(ref.astype(got.dtype))).astype(np.float64)
    return np.abs(got[finite].astype(np.float64) - ref) / spacing


REFERENCES = {"exp": np.exp, "tanh": np.tanh, "log1p": np.log1p}
RANGES = {"exp": (-745.0, 709.0), "tanh": (-20.0, 20.0), "log1p": (-0.99, 50.0)}
RANGES_F32 = {"exp": (-104.0, 89.0), "tanh": (-10.0, 10.0)}


@pytest.mark.parametrize("function", ["exp", "tanh", "log1p"])
def test_float64_helpers_are_within_one_ulp(helpers, function: str) -> None:
    x = _points(np.float64, *RANGES[function])
    got = _apply(helpers, f"_sg_{function}", x)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # log1p(<= -1)
        assert _ulps(got, REFERENCES[function](x)).max() <= 1.0


@pytest.mark.parametrize("function", ["exp", "tanh"])
def test_float32_twins_are_within_one_and_a_half_ulp(helpers, function: str) -> None:
    name = SINGLE_PRECISION[f"_sg_{function}"]
    x = _points(np.float32, *RANGES_F32[function])
    got = _apply(helpers, name, x)
    assert got.dtype == np.float32
    with np.errstate(over="ignore"):
        reference = REFERENCES[function](x.astype(np.float64))
        assert _ulps(got, reference).max() <= 1.5


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_special_values(helpers, dtype: type) -> None:
    suffix = "_f32" if dtype == np.float32 else ""
    big = 89.0 if dtype == np.float32 else 710.0
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, big, -2 * big], dtype=dtype)
    exp = _apply(helpers, f"_sg_exp{suffix}", x)
    np.testing.assert_array_equal(exp, [1.0, 1.0, np.inf, 0.0, np.nan, np.inf, 0.0])
    tanh = _apply(helpers, f"_sg_tanh{suffix}", x)
    np.testing.assert_array_equal(tanh, [0.0, -0.0, 1.0, -1.0, np.nan, 1.0, -1.0])
    assert np.signbit(tanh[1]) and not np.signbit(tanh[0])
