"""Threads: the setting is checked, honoured and restored; results do not depend on it.

Every kernel has a serial and a parallel variant with the same arithmetic (work split into
pieces fixed by the sizes alone).  The bit-for-bit checks run each workload on 1, 2 and 3
threads — 3 in fresh processes (this machine may have 2 cores; Numba's pool is sized at import)
— with the size below which kernels stay serial set to 0, so the parallel variants run even at
test sizes.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import symgrad as sg
from symgrad.errors import OptionError
from symgrad.runtime import threads
from symgrad.runtime.blas import gemm, gemm_blocks, gemm_blocks_par

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def parallel_everywhere(monkeypatch):
    """The parallel variants for any size of work (the threshold is a speed choice only)."""
    monkeypatch.setattr(threads, "PARALLEL_MIN_WORK", 0)


def test_the_thread_count_is_checked():
    for bad in (0, -1, 1.5, "2", True, None):
        with pytest.raises(OptionError, match="threads"):
            sg.set_num_threads(bad)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="SYMGRAD_NUM_THREADS"):
        sg.set_num_threads(threads.max_threads() + 1)


def test_the_thread_count_is_honoured_and_restored():
    before = sg.get_num_threads()
    with sg.num_threads(1):
        assert sg.get_num_threads() == 1
    assert sg.get_num_threads() == before
    with pytest.raises(RuntimeError), sg.num_threads(1):
        raise RuntimeError("inside")
    assert sg.get_num_threads() == before


def test_the_default_is_the_affinity_or_the_environment():
    """Without a setting: the cores the process may run on (not the machine's: run pinned to
    one core, it counts one); SYMGRAD_NUM_THREADS sets it, a bad value is an error."""
    code = "import symgrad as sg, os; print(sg.get_num_threads(), len(os.sched_getaffinity(0)))"
    env = {k: v for k, v in os.environ.items() if k not in ("SYMGRAD_NUM_THREADS",
                                                               "NUMBA_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    got, cores = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, check=True).stdout.split()
    assert got == cores
    one = min(os.sched_getaffinity(0))
    pinned = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {one})).stdout.split()
    assert pinned == ["1", "1"]
    env["SYMGRAD_NUM_THREADS"] = "3"  # more than this machine may have: the pool grows
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "3"
    env["SYMGRAD_NUM_THREADS"] = "many"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "SYMGRAD_NUM_THREADS='many'" in bad.stderr


def _fresh(code: str, **env_vars: str | None) -> subprocess.CompletedProcess[str]:
    """``code`` run in a fresh Python, symgrad importable; ``env_vars`` set (None: unset) over
    an environment without the thread settings of the test run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_THREADING_LAYER", "SYMGRAD_NUM_THREADS", "LD_LIBRARY_PATH")}
    env.update(PYTHONPATH=str(ROOT), NUMBA_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
    for name, value in env_vars.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env,
                          capture_output=True, text=True, check=True)


_STATE = (
    "from symgrad.runtime import threads\n"
    "from symgrad.runtime.blas import blas_threads\n"  # (this import starts the pool or not)
    "import numba\n"
    "print(numba.threading_layer(), threads.pool_by_default(), "
    "threads.use_parallel(1 << 20), blas_threads())\n"
)


def _blas_threads_unlimited() -> str:
    """The kernels' BLAS's thread count in a fresh process before symgrad limits it
    (OPENBLAS_NUM_THREADS=2 as :func:`_fresh` sets it, capped at the cores it may use)."""
    code = ("from threadpoolctl import threadpool_info\n"
            "import scipy.linalg.cython_blas\n"
            "print(max(i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'))")
    return _fresh(code).stdout.strip()


def test_the_pool_runs_on_tbb_where_it_is_installed():
    """A fresh process without NUMBA_THREADING_LAYER: symgrad's parallel kernels run on
    Numba's TBB layer (its library found in the wheel's directory, which the loader does not
    search), which starts a parallel loop in microseconds."""
    if not threads._TBB_IS_A_DEPENDENCY:
        pytest.skip("tbb is a dependency on Linux x86_64 only")
    code = (
        "import numba, numpy as np, symgrad as sg\n"
        "from symgrad.runtime.blas import gemm_blocks_par\n"
        "sg.set_num_threads(2)\n"
        "a = np.ones((256, 256)); c = np.zeros((256, 256))\n"
        "gemm_blocks_par(False, False, 256, 256, 256, 1.0, a, 0, 256, a, 0, 256, 0.0, c, 0,"
        " 256)\n"
        "print(numba.threading_layer(), c[0, 0])\n"
    )
    assert _fresh(code).stdout.split() == ["tbb", "256.0"]


_BLAS_STATE = (
    "import json, os\n"
    "from threadpoolctl import threadpool_info\n"
    "import numpy, scipy.linalg\n"
    "from symgrad.runtime import blas, threads\n"
    "own = threads.own_blas()\n"
    "path = os.path.realpath(own._name) if own is not None else None\n"
    "libs = {('own' if os.path.realpath(i['filepath']) == path else i['internal_api'] + ' ' "
    "+ os.path.basename(i['filepath'])): i['num_threads'] for i in threadpool_info() "
    "if i['user_api'] == 'blas'}\n"
    "print(json.dumps([blas.KERNEL_BLAS, blas.blas_threads(), libs]))\n"
)


def test_the_kernels_call_their_own_blas_and_leave_numpys_and_scipys_alone():
    """The kernels' BLAS is symgrad's own OpenBLAS (the scipy-openblas32 wheel): the pool runs
    it on one thread, and NumPy's and SciPy's BLAS keep their threads."""
    name, threads_in_kernels, libs = json.loads(
        _fresh(_BLAS_STATE, SYMGRAD_NUM_THREADS="2").stdout)
    assert name.startswith("symgrad's own OpenBLAS") and threads_in_kernels == 1
    assert libs.pop("own") == 1
    assert libs and set(libs.values()) == {2}, libs  # NumPy's, SciPy's: OPENBLAS_NUM_THREADS


def test_without_its_own_blas_the_kernels_call_scipys():
    """Without the scipy-openblas32 wheel the kernels call SciPy's BLAS through Numba's helpers
    (the same CBLAS calls, made by functions compiled then): products of every form and both
    precisions equal NumPy's, and the pool runs that BLAS on one thread."""
    code = (
        "import sys; sys.modules['scipy_openblas32'] = None\n" + _BLAS_STATE
        + "import itertools, numpy as np\n"
        "rng = np.random.default_rng(0)\n"
        "for dtype, ta, tb, (m, n) in itertools.product((np.float32, np.float64), (0, 1), "
        "(0, 1), ((5, 3), (1, 3), (5, 1))):\n"
        "    a = rng.normal(size=(4, m) if ta else (m, 4)).astype(dtype)\n"
        "    b = rng.normal(size=(n, 4) if tb else (4, n)).astype(dtype)\n"
        "    c = np.ones((m, n), dtype)\n"
        "    blas.gemm(bool(ta), bool(tb), m, n, 4, 0.5, a, 0, a.shape[1], b, 0, b.shape[1], 2.0,"
        " c, 0, n)\n"
        "    want = 0.5 * (a.T if ta else a).astype(float) @ (b.T if tb else b) + 2.0\n"
        "    np.testing.assert_allclose(c, want, rtol=1e-5 if dtype == np.float32 else 1e-12)\n"
        "print('products ok')\n"
    )
    out = _fresh(code, SYMGRAD_NUM_THREADS="2").stdout.splitlines()
    name, threads_in_kernels, libs = json.loads(out[0])
    assert name.startswith("SciPy's BLAS") and threads_in_kernels == 1
    assert "own" not in libs and 1 in libs.values()  # SciPy's, limited for the pool
    assert out[1] == "products ok"


_BLAS_KERNEL = (
    "import os\n"
    "from symgrad.runtime import blas, threads\n"
    "print(threads.blas_core(threads.own_blas()), os.environ.get('OPENBLAS_CORETYPE'),"
    " blas.KERNEL_BLAS.endswith(threads.blas_core(threads.own_blas()) + ' kernels)'))\n"
)


def test_the_kernels_blas_picks_its_kernel_for_the_processor_whatever_openblas_coretype_says():
    """OPENBLAS_CORETYPE (set on machines whose older OpenBLAS builds fail on the processor)
    does not choose the kernel of symgrad's own, current OpenBLAS: it runs the kernel OpenBLAS
    picks for the processor, and the variable is left as it was for the process's other
    OpenBLAS builds; SYMGRAD_BLAS_CORETYPE forces one on it."""
    pytest.importorskip("scipy_openblas32")
    unset = dict(OPENBLAS_CORETYPE=None, SYMGRAD_BLAS_CORETYPE=None)
    native, was, named = _fresh(_BLAS_KERNEL, **unset).stdout.split()
    assert (was, named) == ("None", "True")
    for machine_wide in ("Haswell", "Core2"):
        got = _fresh(_BLAS_KERNEL, **{**unset, "OPENBLAS_CORETYPE": machine_wide}).stdout.split()
        assert got == [native, machine_wide, "True"]
    forced = _fresh(_BLAS_KERNEL, **{**unset, "SYMGRAD_BLAS_CORETYPE": "Haswell"})
    assert forced.stdout.split() == ["Haswell", "None", "True"]
    both = dict(OPENBLAS_CORETYPE="Core2", SYMGRAD_BLAS_CORETYPE="haswell")
    assert _fresh(_BLAS_KERNEL, **both).stdout.split() == ["Haswell", "Core2", "True"]


def test_two_threads_loading_the_kernels_blas_at_once_leave_openblas_coretype_as_it_was():
    """Two threads' first calls of own_blas at once (its cache has no lock): the environment is
    changed and restored by one at a time, so the second does not save the first's change and
    leave the variable removed."""
    pytest.importorskip("scipy_openblas32")
    code = (
        "import os, threading, time, importlib\n"
        "from symgrad.runtime import threads\n"
        "real = importlib.import_module\n"
        "def slow(name, *args):\n"
        "    if name == threads.OWN_BLAS_PACKAGE:\n"
        "        time.sleep(0.3)\n"
        "    return real(name, *args)\n"
        "threads.importlib = type('m', (), {'import_module': staticmethod(slow)})\n"
        "first = threading.Thread(target=threads.own_blas); first.start()\n"
        "time.sleep(0.1)\n"
        "second = threading.Thread(target=threads.own_blas); second.start()\n"
        "first.join(); second.join()\n"
        "print(os.environ.get('OPENBLAS_CORETYPE'))\n"
    )
    got = _fresh(code, OPENBLAS_CORETYPE="Haswell", SYMGRAD_BLAS_CORETYPE=None)
    assert got.stdout.split() == ["Haswell"]


class _FakeBlas:
    """A column-major CBLAS ``gemm`` stand-in for the check at load (leading dimensions as
    given): its ``dtype`` products are off by ``error``."""

    def __init__(self, error: float, dtype: type) -> None:
        self.error, self.dtype = error, dtype
        self.scipy_cblas_sgemm = self._gemm(np.float32)
        self.scipy_cblas_dgemm = self._gemm(np.float64)

    def _gemm(self, dtype):
        def gemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
            def matrix(pointer, rows, cols, ld):
                assert ld >= rows
                size = cols * ld * np.dtype(dtype).itemsize
                buffer = (ctypes.c_char * size).from_address(pointer.value)
                return np.frombuffer(buffer, dtype).reshape(cols, ld)[:, :rows].T

            op_a = matrix(a, *((k, m) if ta == 112 else (m, k)), lda)
            op_b = matrix(b, *((n, k) if tb == 112 else (k, n)), ldb)
            op_a, op_b = (op_a.T if ta == 112 else op_a), (op_b.T if tb == 112 else op_b)
            out = matrix(c, m, n, ldc)
            result = alpha.value * (op_a.astype(float) @ op_b) + beta.value * out
            out[...] = result + (self.error if dtype == self.dtype else 0.0)

        return gemm


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_check_at_load_finds_a_wrong_product(dtype):
    """The check of the kernels' BLAS as it loads passes a right sgemm and dgemm (leading
    dimensions read as given) and fails either off by far less than the least slip of a real
    kernel (a term dropped or read twice)."""
    assert threads._products_agree(_FakeBlas(0.0, dtype))
    assert not threads._products_agree(_FakeBlas(0.05 if dtype == np.float32 else 1e-9, dtype))


def test_a_kernels_blas_failing_its_check_is_not_used():
    """symgrad's OpenBLAS computing a wrong product at load: a BlasWarning naming the kernel
    and the variable that picks another, and the kernels call SciPy's BLAS."""
    pytest.importorskip("scipy_openblas32")
    code = (
        "from symgrad.runtime import threads\n"
        "threads._products_agree = lambda library: False\n"
        "from symgrad.runtime import blas\n"
        "print(blas.KERNEL_BLAS)\n"
    )
    got = _fresh(code)
    assert got.stdout.startswith("SciPy's BLAS")
    assert "BlasWarning" in got.stderr and "SYMGRAD_BLAS_CORETYPE" in got.stderr


@pytest.mark.parametrize("layer", [None, "tbb", "workqueue"])
def test_the_pool_starts_by_default_only_on_tbb(layer):
    """By default (no layer named) and on TBB the kernels run on the pool unasked, the BLAS in
    them on one thread; on the workqueue layer, which aborts on launches from two Python
    threads at once, the pool waits to be asked for and the BLAS keeps its threads, as before;
    SYMGRAD_NUM_THREADS asks for the pool on any layer."""
    if layer != "workqueue" and not threads._TBB_IS_A_DEPENDENCY:
        pytest.skip("tbb is a dependency on Linux x86_64 only")
    got = _fresh(_STATE, NUMBA_THREADING_LAYER=layer)
    on = layer != "workqueue"
    own = _blas_threads_unlimited()
    assert got.stdout.split() == [layer or "tbb", str(on), str(on), "1" if on else own]
    assert "ThreadPoolWarning" not in got.stderr  # a layer named is the caller's choice
    asked = _fresh(_STATE, NUMBA_THREADING_LAYER=layer, SYMGRAD_NUM_THREADS="2")
    assert asked.stdout.split()[2:] == ["True", "1"]


def test_without_tbb_the_pool_stays_off_and_says_why():
    """Numba's TBB layer not importable (as without the wheel): the workqueue layer, kernels
    serial, the BLAS with its own threads, and a ThreadPoolWarning naming the cause."""
    if not threads._TBB_IS_A_DEPENDENCY:
        pytest.skip("the warning is given where tbb is a dependency")
    code = "import sys; sys.modules['numba.np.ufunc.tbbpool'] = None\n" + _STATE
    got = _fresh(code)
    assert got.stdout.split() == ["workqueue", "False", "False", _blas_threads_unlimited()]
    assert "ThreadPoolWarning" in got.stderr and "TBB layer does not import" in got.stderr


def test_a_layer_numba_started_before_symgrad_is_kept_and_the_pool_stays_off():
    """A parallel function run before symgrad's first kernel fixes Numba's layer (here the
    workqueue, chosen in the caller's code); symgrad does not pretend it is TBB: the pool stays
    off, with a warning naming the layer."""
    if not threads._TBB_IS_A_DEPENDENCY:
        pytest.skip("the warning is given where tbb is a dependency")
    code = (
        "import numba, numpy as np\n"
        "numba.config.THREADING_LAYER = 'workqueue'\n"
        "@numba.njit(parallel=True)\n"
        "def f(a):\n"
        "    for i in numba.prange(a.size):\n"
        "        a[i] += 1.0\n"
        "f(np.zeros(10))\n"
    ) + _STATE
    got = _fresh(code)
    assert got.stdout.split() == ["workqueue", "False", "False", _blas_threads_unlimited()]
    assert "ThreadPoolWarning" in got.stderr and "Numba runs its workqueue layer" in got.stderr


@pytest.mark.parametrize("layer", ["workqueue", "tbb"])
def test_serial_runs_the_serial_variants_and_leaves_the_pool_as_it_is(layer):
    """``with serial():`` no parallel variant inside, the thread count back after; the pool
    neither started (workqueue: opt-in) nor stopped (TBB: on) by it."""
    if layer == "tbb" and not threads._TBB_IS_A_DEPENDENCY:
        pytest.skip("tbb is a dependency on Linux x86_64 only")
    code = (
        "from symgrad.runtime import threads\n"
        "from symgrad.runtime.blas import blas_threads\n"
        "def state():\n"
        "    return [threads._pool, threads.use_parallel(1 << 20), blas_threads()]\n"
        "before = state()\n"
        "with threads.serial():\n"
        "    inside = state()\n"
        "print(before, inside, state())\n"
    )
    on = layer == "tbb"
    blas = 1 if on else int(_blas_threads_unlimited())
    want = f"[{on}, {on}, {blas}] [{on}, False, {blas}] [{on}, {on}, {blas}]"
    assert _fresh(code, NUMBA_THREADING_LAYER=layer).stdout.strip() == want


def test_tbb_too_old_or_missing_is_reported(monkeypatch):
    """The loader's answers: no library anywhere, a library without TBB's version function, a
    TBB older than Numba's layer takes (Ubuntu 22.04's 2021.5)."""
    monkeypatch.setattr(threads, "_tbb_candidates", lambda: iter(["/nonexistent/libtbb.so.12"]))
    assert "no libtbb.so.12 was found" in threads._load_tbb()
    monkeypatch.setattr(threads, "_tbb_candidates", lambda: iter(["libc.so.6"]))
    assert "no libtbb.so.12 was found" in threads._load_tbb()

    def version() -> int:
        return 12050

    fake = types.SimpleNamespace(TBB_runtime_interface_version=version)
    monkeypatch.setattr(threads.ctypes, "CDLL", lambda path, mode=0: fake)
    assert "interface version 12050" in threads._load_tbb()


def test_two_python_threads_may_run_parallel_kernels_at_once():
    """TBB takes concurrent launches: each Python thread's products are right (and the bits
    of the serial pieces)."""
    from concurrent.futures import ThreadPoolExecutor

    if threads._running_layer() != "tbb":
        pytest.skip("the workqueue layer does not take concurrent launches")
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((300, 200)), rng.standard_normal((200, 160))
    want = np.zeros((300, 160))
    with sg.num_threads(1):  # the pool on: BLAS on one thread, the pieces one after another
        gemm_blocks(False, False, 300, 160, 200, 1.0, a, 0, 200, b, 0, 160, 0.0, want, 0, 160)

    def product(_: int) -> np.ndarray:
        c = np.zeros((300, 160))
        with sg.num_threads(min(2, threads.max_threads())):
            for _ in range(20):
                gemm_blocks_par(False, False, 300, 160, 200, 1.0, a, 0, 200, b, 0, 160, 0.0,
                                c, 0, 160)
        return c

    with ThreadPoolExecutor(4) as pool:
        for c in pool.map(product, range(8)):
            np.testing.assert_array_equal(c, want)


# (m, n, k): pieces of rows (the last one short), of columns, of the sum over k (a weight
# gradient's shape: a long sum, a small C), and a product too small to split.
_SPLITS = [(300, 160, 100), (160, 300, 100), (96, 80, 700), (30, 20, 10)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("m, n, k", _SPLITS)
def test_split_products_are_the_same_serially_and_in_parallel(dtype, ta, tb, m, n, k):
    """Each split is a product in pieces (on a view inside a wider C, added to what C held):
    right, and the same bits serially and on 1 or 2 threads."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    start = rng.standard_normal((m + 1, n + 3)).astype(dtype)
    alpha, beta = 0.5, 1.0
    want = start.astype(np.float64)
    want[1:, 2 : 2 + n] = alpha * ((a.T if ta else a) @ (b.T if tb else b)) + beta * want[1:, 2:-1]
    got = []
    for f in (gemm, gemm_blocks, gemm_blocks_par):
        for count in (1, 2):
            c = start.copy()
            with sg.num_threads(min(count, threads.max_threads())):
                f(ta, tb, m, n, k, alpha, a, 0, a.shape[1], b, 0, b.shape[1], beta, c, n + 5, n + 3)
            got.append(c)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    for c in got:
        np.testing.assert_allclose(c, want, rtol=tol, atol=tol)
    for c in got[3:]:  # every split product: the same bits on any number of threads
        np.testing.assert_array_equal(c, got[2])


def test_the_kernels_see_the_blas_thread_count():
    """``blas_threads()`` is what BLAS itself reports, and follows a limit set from Python."""
    from threadpoolctl import threadpool_limits

    from symgrad.runtime.blas import blas_threads
    from symgrad.runtime.threads import kernel_blas

    (lib,) = kernel_blas()
    assert blas_threads() == lib.num_threads
    with threadpool_limits(1):
        assert blas_threads() == 1
    if lib.num_threads > 1:
        with threadpool_limits(2):
            assert blas_threads() == 2


@pytest.mark.parametrize("m, n, k", _SPLITS[:3])
def test_blas_with_threads_of_its_own_gets_the_product_whole(m, n, k):
    """BLAS threaded (a limit set from outside, e.g. threadpoolctl): one call, the bits of
    ``gemm``; BLAS on one thread (the pool's setting): the pieces, the bits of
    ``gemm_blocks_par``."""
    from threadpoolctl import threadpool_limits

    from symgrad.runtime.blas import blas_threads

    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    out = {}
    threaded = False  # whether BLAS took the 2 threads (a BLAS on one core keeps one)
    runs = (("whole", gemm, 2), ("blocks", gemm_blocks, 2), ("blocks", gemm_blocks, 1),
            ("par", gemm_blocks_par, 1))
    for name, f, count in runs:
        c = np.zeros((m, n))
        with threadpool_limits(count):
            threaded = threaded or blas_threads() > 1
            f(False, False, m, n, k, 1.0, a, 0, k, b, 0, n, 0.0, c, 0, n)
        out[name, count] = c
    np.testing.assert_array_equal(out["blocks", 1], out["par", 1])
    expected = out["whole", 2] if threaded else out["par", 1]
    np.testing.assert_array_equal(out["blocks", 2], expected)
    np.testing.assert_allclose(out["blocks", 2], a @ b, rtol=1e-12, atol=1e-12)


def test_the_split_depends_on_the_sizes_alone():
    """Rows for a tall product, columns for a wide one, the sum for a long one with a small C
    (a weight gradient); pieces a multiple of ALIGN but the last, none tiny; no split below
    MIN_SPLIT_WORK."""
    from symgrad.runtime.blas import _COLUMNS, _ROWS, _TERMS, _WHOLE, ALIGN, _blocks

    assert _blocks(2048, 1536, 384) == (_ROWS, 4, 512)
    assert _blocks(2048, 384, 1536)[0] == _ROWS  # a partial C would cost more than re-packing
    assert _blocks(384, 2048, 384)[0] == _COLUMNS
    assert _blocks(384, 384, 2048) == (_TERMS, 4, 512)
    how, pieces, size = _blocks(848, 384, 384)
    assert (how, pieces) == (_ROWS, 4) and size % ALIGN == 0 and (pieces - 1) * size < 848
    assert _blocks(64, 64, 64)[0] == _WHOLE
    for side in range(300, 1500, 7):  # the last piece is never shorter than the others
        how, pieces, size = _blocks(side, 120, 120)  # only the rows are long enough
        assert how == _ROWS and 2 <= pieces <= 4 and size % ALIGN == 0
        assert size <= side - (pieces - 1) * size < size + pieces * ALIGN


def test_large_work_runs_the_parallel_variants(parallel_everywhere):
    op = sg.builtin("layer_norm")
    x = np.random.default_rng(0).standard_normal((6, 10))
    w, b = np.ones(10), np.zeros(10)
    op._kernels.clear()  # the op is shared: forget the kernels other tests looked up
    with sg.num_threads(1):
        serial = op(x, w, b)
    assert ("forward_par", np.dtype(np.float64)) not in op._kernels
    if threads.max_threads() > 1:
        with sg.num_threads(2):
            parallel = op(x, w, b)
        assert ("forward_par", np.dtype(np.float64)) in op._kernels
        np.testing.assert_array_equal(parallel, serial)



@pytest.mark.parametrize("rows", [1, 203, 5000])
def test_sums_over_rows_in_chunks_are_the_float64_sums(rows):
    """A bias's gradient and layer norm's weight gradient sum the rows in chunks: one chunk,
    a short last chunk (203 rows), more rows than MAX_CHUNKS chunks of ROW_CHUNK (5000) — the
    float64 sum's value every time.  (Serial and parallel bits: the 1/2/3-thread workload
    below, at 150 and 5,003 rows.)"""
    from symgrad.codegen.lower import MAX_CHUNKS, ROW_CHUNK

    if rows > 1000:
        assert rows > ROW_CHUNK * MAX_CHUNKS  # chunks of more than ROW_CHUNK rows
    dtype = np.float32
    rng = np.random.default_rng(rows)
    n = 8 if rows > 1000 else 48
    x, r, g = (rng.standard_normal((rows, n)).astype(dtype) for _ in range(3))
    w, b = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    wl, gl = rng.standard_normal((5, n)).astype(dtype), rng.standard_normal((rows, 5)).astype(dtype)
    grads = sg.builtin("add_layer_norm").vjp(x, r, w, b, g)
    bias = sg.builtin("linear").vjp(x, wl, b[:5], gl)[2]
    np.testing.assert_allclose(grads[3], g.astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bias, gl.astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-5)


def test_the_gradients_of_a_layer_norm_run_in_one_loop_on_the_threads():
    """Layer norm's gradients (input, weight, bias) share one loop over the rows in the
    parallel variant too: chunks of rows on the threads, each row read once for all three."""
    import ast

    tree = ast.parse(sg.builtin("add_layer_norm").source)
    for function in tree.body:
        if isinstance(function, ast.FunctionDef) and function.name.startswith("vjp") and (
            function.name.endswith("_par")
        ):
            loops = [ast.unparse(n.iter) for n in function.body if isinstance(n, ast.For)]
            assert sum(loop.startswith("prange(") for loop in loops) == 1, (function.name, loops)


def test_a_loop_over_few_rows_without_sums_is_not_cut_into_fewer_chunks():
    """A masked softmax's loop runs over the batch (32 rows of (h, s) work each, in W4): in
    chunks for its buffers' sake, but of any length (``least`` 1), so that 32 rows stay 32
    chunks for the threads — the chunks of at least ROW_CHUNK rows are for sums over rows."""
    import ast

    tree = ast.parse(sg.builtin("masked_softmax").source)
    calls = [ast.unparse(node) for node in ast.walk(tree)
             if isinstance(node, ast.Call) and ast.unparse(node.func) == "_sg_chunk_rows"]
    assert calls and all(call.endswith(", 1)") for call in calls), calls


def test_a_sum_over_an_inner_axis_per_batch_element_runs_its_batch_on_the_threads(
    parallel_everywhere,
):
    """``grad_c[b, k] = Σ_t g[b, t, k]·X[b, t, k]`` (a per-example scale): each batch element
    sums into its own elements, so the batch loop runs on the threads — the same bits as
    serially, and the float64 sum's value."""
    import sympy as sp

    B, T, K = sp.symbols("B T K", integer=True, positive=True)
    b, t, k = sp.symbols("b t k", integer=True)
    X, c = sp.IndexedBase("X", shape=(B, T, K)), sp.IndexedBase("c", shape=(B, K))
    op = sg.tensor_op(X[b, t, k] * c[b, k], out=(b, t, k), inputs=[X, c], name="batch_scale")
    par = op.source[op.source.index("def vjp_par("):]
    par = par[: par.index("return None")]
    # the sum (with X's gradient, over the same batch rows) inside the one loop on the threads
    assert par.count("prange(") == 1, par
    assert re.search(r"prange\(.*\n(.*\n)*?\s+_a\d+\[\w+, \w+\] \+=", par), par
    rng = np.random.default_rng(2)
    x, g = rng.standard_normal((6, 70, 5)), rng.standard_normal((6, 70, 5))
    scale = rng.standard_normal((6, 5))
    with sg.num_threads(1):
        serial = op.vjp(x, scale, g)
    np.testing.assert_allclose(serial[1], (g * x).sum(axis=1), rtol=1e-12, atol=1e-12)
    if threads.max_threads() > 1:
        with sg.num_threads(2):
            parallel = op.vjp(x, scale, g)
        assert ("vjp_par", np.dtype(np.float64)) in op._kernels
        for one, two in zip(serial, parallel, strict=True):
            np.testing.assert_array_equal(one, two)

# One script, run on 1, 2 and 3 threads: ops on the tape, elementwise ops, a compiled step
# (a whole-function step and a driver step), and a training run through fit; it prints a
# hash of every result.
_WORKLOAD = """
import hashlib, json, sys
import numpy as np
import symgrad as sg
from symgrad import nn, optim
from symgrad.compile import compile_step
from symgrad.nn.bert import BertConfig, BertEncoder, SequenceClassifier
from symgrad.runtime import threads
from symgrad.train import fit

threads.PARALLEL_MIN_WORK = 0
assert sg.get_num_threads() == int(sys.argv[1]), sg.get_num_threads()
digest = {}

def put(name, *arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    digest[name] = h.hexdigest()

rng = np.random.default_rng(0)
for dt in (np.float32, np.float64):
    x = rng.standard_normal((150, 300)).astype(dt)
    r = rng.standard_normal((150, 300)).astype(dt)
    w, b = rng.standard_normal(300).astype(dt), rng.standard_normal(300).astype(dt)
    g = rng.standard_normal((150, 300)).astype(dt)
    aln = sg.builtin("add_layer_norm")
    put(f"add_layer_norm {dt.__name__}", aln(x, r, w, b), *aln.vjp(x, r, w, b, g))
    lin = sg.builtin("linear")
    wl = rng.standard_normal((290, 300)).astype(dt)
    gl = rng.standard_normal((150, 290)).astype(dt)
    put(f"linear {dt.__name__}", lin(x, wl, b[:290]), *lin.vjp(x, wl, b[:290], gl))
    xs, gs = rng.standard_normal((5003, 8)).astype(dt), rng.standard_normal((5003, 8)).astype(dt)
    w8, b8, w38 = w[:8].copy(), b[:8].copy(), wl[:3, :8].copy()
    put(f"sums over 5003 rows {dt.__name__}", *aln.vjp(xs, xs, w8, b8, gs),
        *lin.vjp(xs, w38, b8[:3].copy(), gs[:, :3].copy()))
    if dt == np.float32:  # elementwise ops: one dtype (both dtypes are one lowering)
        gelu = sg.builtin("gelu")
        put(f"gelu {dt.__name__}", gelu(x), *gelu.vjp(x, g))
        ce = sg.builtin("bce_with_logits")
        y = (rng.random((150, 300)) > 0.5).astype(dt)
        value, grads = ce.value_and_vjp(x, y, reduction="mean")
        put(f"bce mean {dt.__name__}", value, *[q for q in grads if q is not None])

config = BertConfig(vocab_size=40, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                    num_hidden_layers=1, max_position_embeddings=12)
encoder = BertEncoder(config, np.float32)
for p in encoder.parameters():
    p.data[...] = rng.normal(size=p.data.shape) * 0.2
model = SequenceClassifier(encoder, nn.Linear(16, 2, rng=rng))
step = compile_step(model, nn.CrossEntropyLoss(), optim.AdamW(model.parameters(), lr=1e-3),
                    clip_grad_norm=1.0)
ids = rng.integers(0, 40, (5, 9))
mask = np.ones((5, 9), np.float32)
mask[1, 6:] = 0
losses = [step(ids, mask, np.array([0, 1, 1, 0, 1])) for _ in range(2)]
put("bert step", np.array(losses), *[p.data for p in model.parameters()])

mlp = nn.Sequential(nn.Linear(12, 40, dtype=np.float64, rng=rng), nn.Tanh(),
                    nn.Linear(40, 3, dtype=np.float64, rng=rng))
xs = rng.standard_normal((64, 12))
ys = rng.integers(0, 3, 64)
history = fit(mlp, nn.CrossEntropyLoss(), optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9),
              xs, ys, epochs=2, batch_size=16, seed=0)
put("mlp fit", np.array(history.step_losses), *[p.data for p in mlp.parameters()])
parallel = any(name.endswith("_par") for name, _ in aln._kernels)
print(json.dumps({"digest": digest, "parallel": parallel}))
"""


def _start(script: Path, count: int) -> subprocess.Popen:
    env = dict(os.environ, SYMGRAD_NUM_THREADS=str(count), NUMBA_NUM_THREADS="3",
               PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(script), str(count)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _digest(run: subprocess.Popen, count: int) -> dict[str, str]:
    out, err = run.communicate(timeout=1800)
    assert run.returncode == 0, err[-3000:]
    found = json.loads(out.strip().splitlines()[-1])
    assert found["parallel"] == (count > 1)  # 1 thread: the serial variants
    return found["digest"]


def test_results_are_the_same_bits_on_1_2_and_3_threads(tmp_path):
    # 1 and 2 threads at once (each compiles the variants it runs: serial, parallel), then 3
    # (the parallel variants from the disk cache)
    script = tmp_path / "workload.py"
    script.write_text(_WORKLOAD)  # once: a running process may still be reading it
    runs = {count: _start(script, count) for count in (1, 2)}
    one, two = _digest(runs[1], 1), _digest(runs[2], 2)
    assert len(one) == 10
    assert two == one, "2 threads differ from 1"
    assert _digest(_start(script, 3), 3) == one, "3 threads differ from 1"
