"""The op outputs' memory pool: memory is reused only when nothing refers to it, results do not
depend on it, its limit holds."""

from __future__ import annotations

import numpy as np
import pytest

import symgrad as sg
from symgrad.errors import OptionError, SymgradError
from symgrad.nn import Linear, Parameter, Tape
from symgrad.runtime import output_pool as pool_module
from symgrad.runtime.output_pool import MIN_BYTES, OutputPool, _size_class

BIG = (256, 128)  # 128 KiB of float32, 256 KiB of float64: pooled


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def test_size_classes_cover_the_request_with_at_most_a_quarter_more() -> None:
    for n in [*range(1, 300), *np.random.default_rng(0).integers(300, 1 << 40, 2000).tolist()]:
        size = _size_class(int(n))
        assert n <= size <= max(n * 1.25, 8), n
    assert {_size_class(n) for n in range(1 << 20, 1 << 21)} == {(1 << 18) * k for k in range(4, 9)}


def test_memory_is_reused_once_nothing_refers_to_it() -> None:
    p = OutputPool(1 << 30)
    a = p.empty(BIG, np.float32)
    first = _address(a)
    b = p.empty(BIG, np.float32)
    assert not np.shares_memory(a, b), "an array in use was handed out again"
    del a
    c = p.empty(BIG, np.float32)
    assert _address(c) == first
    assert c.shape == BIG and c.dtype == np.float32 and c.flags.c_contiguous and c.flags.writeable
    # another dtype and shape of the same size class takes the same memory
    del c
    d = p.empty((128, 128), np.float64)
    assert _address(d) == first
    assert p.held == 2 * _size_class(BIG[0] * BIG[1] * 4)


@pytest.mark.parametrize(
    "keep",
    [
        lambda a: a.reshape(-1),
        lambda a: a[3:5],
        lambda a: memoryview(a),
        lambda a: a.T,
        lambda a: [a],
        lambda a: np.frombuffer(a, dtype=np.uint8),
    ],
    ids=["reshape", "slice", "memoryview", "transpose", "list", "frombuffer"],
)
def test_memory_referred_to_by_anything_is_not_reused(keep) -> None:  # type: ignore[no-untyped-def]
    p = OutputPool(1 << 30)
    a = p.empty(BIG, np.float32)
    a[...] = 7.0
    held = keep(a)
    del a
    b = p.empty(BIG, np.float32)
    b[...] = -1.0
    kept = np.asarray(held[0] if isinstance(held, list) else held)
    assert not np.shares_memory(kept, b)
    expected = keep(np.full(BIG, 7.0, np.float32))
    expected = expected[0] if isinstance(expected, list) else expected
    np.testing.assert_array_equal(kept, np.asarray(expected))


def test_a_torch_tensor_keeps_the_memory() -> None:
    torch = pytest.importorskip("torch")
    p = OutputPool(1 << 30)
    a = p.empty(BIG, np.float32)
    a[...] = 3.0
    t = torch.from_numpy(a)
    del a
    b = p.empty(BIG, np.float32)
    b[...] = 0.0
    assert float(t.sum()) == 3.0 * BIG[0] * BIG[1]


def test_small_arrays_and_a_zero_limit_are_not_pooled() -> None:
    p = OutputPool(1 << 30)
    small = p.empty((MIN_BYTES // 8 - 1,), np.float64)
    assert small.base is None and p.held == 0
    off = OutputPool(0)
    assert off.empty(BIG, np.float32).base is None and off.held == 0


def test_the_limit_drops_unused_buffers_then_falls_back_to_fresh_arrays() -> None:
    size = _size_class(BIG[0] * BIG[1] * 4)
    p = OutputPool(2 * size)
    a, b = p.empty(BIG, np.float32), p.empty(BIG, np.float32)
    c = p.empty(BIG, np.float32)  # over the limit, both buffers in use: a fresh array
    assert c.base is None and p.held == 2 * size
    del a
    # a larger size class: the unused buffer is dropped to make room, still not enough room
    d = p.empty((BIG[0] * 2, BIG[1]), np.float32)
    assert d.base is None and p.held == size
    del b, c, d
    assert p.release() == size and p.held == 0


def test_set_limit_and_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "_POOL", OutputPool(1 << 30))
    a = pool_module.empty(BIG, np.float32)
    assert a.base is not None
    del a
    assert sg.output_pool_limit() == 1 << 30
    previous = sg.set_output_pool_limit(0)  # drops the unused buffer now
    assert previous == 1 << 30 and pool_module.pool().held == 0
    assert pool_module.empty(BIG, np.float32).base is None
    pool_module.set_output_pool_limit(1 << 30)
    kept = pool_module.empty(BIG, np.float32)
    unused = pool_module.empty(BIG, np.float32)
    del unused
    assert sg.release_output_pool() == _size_class(BIG[0] * BIG[1] * 4)
    assert kept.base is not None and pool_module.pool().held == _size_class(kept.nbytes)
    assert sg.set_output_pool_limit(np.int64(1 << 20)) == 1 << 30  # any whole number
    assert sg.output_pool_limit() == 1 << 20
    for bad in (-1, 1.5, True, "1", None):
        with pytest.raises(OptionError, match="whole number of bytes"):
            pool_module.set_output_pool_limit(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["lots", "-3", "nan", "inf"])
def test_a_bad_environment_value_is_named(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("SYMGRAD_OUTPUT_POOL_MB", text)
    with pytest.raises(SymgradError, match="SYMGRAD_OUTPUT_POOL_MB"):
        pool_module._limit_from_env()


def test_the_environment_sets_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYMGRAD_OUTPUT_POOL_MB", "0.5")
    assert pool_module._limit_from_env() == 1 << 19
    monkeypatch.delenv("SYMGRAD_OUTPUT_POOL_MB")
    assert pool_module._limit_from_env() == 1024 << 20


def _tape_step(dtype: type) -> list[np.ndarray]:
    """A few steps of a small network recorded on a Tape; every gradient, every step."""
    rng = np.random.default_rng(1)
    first, second = Linear(96, 160, dtype=dtype, rng=rng), Linear(160, 96, dtype=dtype, rng=rng)
    gelu, mse = sg.builtin("gelu"), sg.builtin("mse")
    x = rng.normal(size=(300, 96)).astype(dtype)
    target = rng.normal(size=(300, 96)).astype(dtype)
    seen = []
    for _ in range(3):
        tape = Tape()
        h = tape.apply(gelu, first.record(tape, x))
        y = second.record(tape, h)
        z = tape.apply(sg.builtin("add"), y, y)  # two cotangents for y: summed
        loss = tape.apply(mse, z, target)
        tape.backward(loss, np.ones_like(loss))
        params: list[Parameter] = [*first.parameters(), *second.parameters()]
        seen += [p.grad.copy() for p in params]  # type: ignore[union-attr]
        for p in params:
            p.data -= np.asarray(0.01, dtype) * p.grad  # type: ignore[operator]
            p.grad = None
    return seen


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_do_not_depend_on_the_pool(monkeypatch: pytest.MonkeyPatch, dtype: type) -> None:
    monkeypatch.setattr(pool_module, "_POOL", OutputPool(0))
    fresh = _tape_step(dtype)
    shared = OutputPool(1 << 30)
    monkeypatch.setattr(pool_module, "_POOL", shared)
    pooled = _tape_step(dtype)
    assert shared.held > 0, "the tape's arrays did not come from the pool"
    for a, b in zip(fresh, pooled, strict=True):
        np.testing.assert_array_equal(a, b)
