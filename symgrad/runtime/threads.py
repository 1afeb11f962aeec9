"""The threads symgrad's kernels run on: one pool (Numba's), results the same on any number.

Every generated kernel exists twice with the same arithmetic: a serial variant and a parallel
one (``forward`` and ``forward_par``, see :mod:`symgrad.codegen.lower`).  The parallel variant
runs its outer loops over rows as ``prange`` loops and its GEMMs as fixed blocks of output rows,
each one single-threaded BLAS call, all on Numba's thread pool — BLAS's own threads are off for
symgrad's kernels (they would spin against Numba's, :func:`limit_blas`).  Work is split into
pieces whose boundaries depend on the sizes alone, never on the number of threads, and each
piece is computed as the serial variant computes it: a run on 1, 2 or 16 threads gives the same
bits, and so does the serial variant.

The pool is Numba's TBB layer (the ``tbb`` wheel, a dependency on Linux x86_64) and Numba's
``workqueue`` layer where TBB does not load, unless ``NUMBA_THREADING_LAYER`` names another
(the comment at ``_load_tbb()``'s call says why).  Like Numba's, the thread count is per
calling thread; on the workqueue layer two Python threads should not run parallel kernels at
the same moment (it does not take concurrent launches; TBB does).

Which variant runs is decided per call from the size of the work (:func:`use_parallel`): a small
op runs serially, where starting threads would cost more than it saves (a few microseconds).

**On by default** (on TBB, :func:`pool_by_default`; elsewhere opt-in).  From the first kernel
on, symgrad's kernels run on the pool with as many threads as the process may use (unless
:func:`set_num_threads` or ``SYMGRAD_NUM_THREADS`` says otherwise), and the BLAS they call runs
on one thread per call; ``SYMGRAD_NUM_THREADS=1`` runs every kernel serially.  The pool used to
be opt-in, the default leaving OpenBLAS its own threads for the GEMMs — nondeterministic, and
on the workqueue layer the faster of the two on the main job (1.10× torch's epoch against
1.35×).  On Numba's TBB layer the pool is the faster (benchmarks/RESULTS-threads.md), and it
gives the same bits on any number of threads.

The thread count: :func:`set_num_threads`, else the environment variable
``SYMGRAD_NUM_THREADS``; before either, Numba's default: the cores the process may run on (its
CPU affinity).
Numba's pool cannot grow past ``NUMBA_NUM_THREADS`` once started: a larger
``SYMGRAD_NUM_THREADS`` raises that limit when it is set before symgrad is imported.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.metadata
import itertools
import os
import platform
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numba  # symgrad/__init__.py sized Numba's pool before numba was first imported

from ..errors import BlasWarning, OptionError, ThreadPoolWarning

#: Elements of a call's largest array below which a kernel runs its serial variant: below
#: this, starting the pool costs more than it saves.
PARALLEL_MIN_WORK = 1 << 15

_ENV = "SYMGRAD_NUM_THREADS"


def _from_env() -> int | None:
    text = os.environ.get(_ENV)
    if text is None or not text.strip():
        return None
    try:
        value = int(text)
    except ValueError:
        raise OptionError(
            f"{_ENV}={text!r} is not a whole number: set it to the number of threads symgrad's "
            "kernels may use (e.g. 4), or unset it to use every core this process may run on"
        ) from None
    if value < 1:
        raise OptionError(f"{_ENV}={text!r} must be at least 1")
    return value


#: The oldest TBB Numba's layer takes (``TBB_INTERFACE_VERSION``, 2021 update 6).
_TBB_INTERFACE = 12060
_TBB_LIBRARY = "libtbb.so.12"
#: pyproject.toml's marker for the ``tbb`` dependency.
_TBB_IS_A_DEPENDENCY = sys.platform.startswith("linux") and platform.machine() == "x86_64"


def _tbb_candidates() -> Iterator[str]:
    """Where the TBB library may be: the ``tbb`` wheel's file first (pip puts it in
    ``<prefix>/lib``, a directory the loader does not search), the loader's own path (conda,
    ``LD_LIBRARY_PATH``) last — a system's older TBB loaded first (Ubuntu 22.04's is 2021.5,
    too old for Numba) would stand for ``libtbb.so.12`` from then on."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        yield os.path.join(prefix, "lib", _TBB_LIBRARY)
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == _TBB_LIBRARY:
            yield str(file.locate())
    yield _TBB_LIBRARY


def _load_tbb() -> str | None:
    """Load TBB (globally, so that Numba's TBB layer links to it): ``None`` when Numba's TBB
    layer can run on it, else why not."""
    if not sys.platform.startswith("linux"):
        return "symgrad looks for TBB on Linux only"
    for path in _tbb_candidates():
        try:
            library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            version = library.TBB_runtime_interface_version
        except (OSError, AttributeError):
            continue
        version.restype = ctypes.c_int
        found = int(version())
        if found < _TBB_INTERFACE:  # loaded now, it stands for libtbb.so.12: no other will do
            return (f"{path} is TBB interface version {found}; Numba's TBB layer needs "
                    f"{_TBB_INTERFACE} or later (pip install 'tbb>=2021.6')")
        try:
            import numba.np.ufunc.tbbpool  # noqa: F401  # links to the library loaded above
        except ImportError as error:
            return f"Numba's TBB layer does not import ({error})"
        return None
    return f"no {_TBB_LIBRARY} was found (pip install 'tbb>=2021.6')"


# Numba's TBB layer when it loads, else its workqueue layer — unless NUMBA_THREADING_LAYER or
# the caller's code chose one.  A parallel loop costs ~3 µs to start on TBB and 110–226 µs on
# the workqueue (whose workers sleep between loops and the calling thread only waits) — at
# hundreds of loops per step that was most of what the second core gained.  Numba's OpenMP
# layer starts as fast but runs on GNU OpenMP, which torch loads too (under the same name):
# the two then share one thread-count setting, and a thread count set for symgrad's kernels
# makes torch's parallel regions run on as many threads (measured: torch's MLP step 70x slower
# on one core).  TBB is loaded in any case: a layer asked for by name ("tbb", "safe") finds it.
_TBB_PROBLEM = _load_tbb()
if str(numba.config.THREADING_LAYER) == "default":  # type: ignore[attr-defined]
    numba.config.THREADING_LAYER = "workqueue" if _TBB_PROBLEM else "tbb"  # type: ignore[attr-defined]

_configured = False
_pool = False  # the pool started (configure, set_num_threads): BLAS on one thread in kernels


def max_threads() -> int:
    """The most threads this process can use (Numba's pool size, ``NUMBA_NUM_THREADS``)."""
    return int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]


def _check(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise OptionError(f"the number of threads must be a whole number, got {n!r}")
    if n < 1:
        raise OptionError(f"the number of threads must be at least 1, got {n}")
    if n > max_threads():
        raise OptionError(
            f"{n} threads asked, but this process's thread pool has {max_threads()}: set "
            f"{_ENV}={n} (or NUMBA_NUM_THREADS={n}) in the environment before importing symgrad"
        )
    return n


#: The package that brings symgrad's own OpenBLAS (``scipy-openblas32``, a dependency).
OWN_BLAS_PACKAGE = "scipy_openblas32"


#: Environment variable that forces a kernel on symgrad's own OpenBLAS (OpenBLAS's core names:
#: ``Haswell``, ``SkylakeX``, ``Zen``, ...); unset, OpenBLAS picks the kernel for the processor.
BLAS_CORETYPE_ENV = "SYMGRAD_BLAS_CORETYPE"

#: The variable by which OpenBLAS, as it loads, is told to use one kernel, on every OpenBLAS in
#: the process that loads after it is set.
_OPENBLAS_CORETYPE = "OPENBLAS_CORETYPE"


@functools.cache
def own_blas() -> ctypes.CDLL | None:
    """symgrad's own OpenBLAS, the BLAS generated kernels call (loaded here; its symbols carry
    the wheel's ``scipy_`` prefix, so no other BLAS's calls reach it), or None when the
    ``scipy-openblas32`` wheel is not there — kernels then call SciPy's BLAS through Numba's
    ``numba_xxgemm`` (:mod:`symgrad.runtime.blas`).  A copy of its own, so that running it on
    one thread for the pool changes no other library's BLAS (NumPy's, SciPy's); and a newer
    OpenBLAS than SciPy's (its GEMMs 5–9 % faster on a BERT layer's products,
    benchmarks/RESULTS-threads.md).

    **Its kernel.**  ``OPENBLAS_CORETYPE`` makes every OpenBLAS that loads after it is set use
    the kernel it names; machines set it (``Haswell``) to keep older builds — NumPy's, SciPy's —
    off the kernels they get wrong on a newer processor.  symgrad's copy is a current build
    (``scipy-openblas32`` ≥ 0.3.34, a dependency): it loads with the kernel OpenBLAS itself
    picks for the processor (``OPENBLAS_CORETYPE`` is left as it was, for the others), or the one
    ``SYMGRAD_BLAS_CORETYPE`` names (as OpenBLAS takes ``OPENBLAS_CORETYPE``: a kernel this build
    lacks runs as the one it stands for, ``Zen`` as ``Haswell``; a name it does not know is
    ignored — ``OPENBLAS_VERBOSE=2`` prints its choice, :data:`symgrad.runtime.blas.KERNEL_BLAS`
    names it), and its products are checked once as it loads
    (:func:`_products_agree`); a kernel that fails the check is not used (a
    :class:`~symgrad.errors.BlasWarning`, SciPy's BLAS instead).  A process that imported the
    ``scipy_openblas32`` package before symgrad loaded the library then, with the environment of
    that moment (``KERNEL_BLAS`` says which kernel runs).  On an AMD Zen 5 with
    ``OPENBLAS_CORETYPE=Haswell`` set: 188–215 GFLOP/s a core (SkylakeX's AVX-512 kernels)
    against 97–112 (Haswell's) on a BERT layer's products (benchmarks/RESULTS-encoder.md)."""
    with _ENVIRONMENT:  # (two threads' first calls: the second would save the first's change)
        library = _load_own_blas()
    if library is None:
        return None
    core = blas_core(library)
    if not _products_agree(library):
        warnings.warn(
            f"symgrad's own OpenBLAS ({core} kernel) computed a wrong product in its check at "
            f"load: the kernels call SciPy's BLAS instead. Name another kernel in "
            f"{BLAS_CORETYPE_ENV} (e.g. Haswell) to use symgrad's OpenBLAS",
            BlasWarning,
            stacklevel=2,
        )
        return None
    return library


#: Held while the environment is changed to load symgrad's OpenBLAS.
_ENVIRONMENT = threading.Lock()


def _load_own_blas() -> ctypes.CDLL | None:
    """symgrad's OpenBLAS loaded with the kernel OpenBLAS picks, or SYMGRAD_BLAS_CORETYPE's
    (:func:`own_blas`); None without the wheel."""
    forced = os.environ.get(BLAS_CORETYPE_ENV, "").strip()
    machine_wide = os.environ.get(_OPENBLAS_CORETYPE)
    try:  # (importing the package loads the library: OpenBLAS picks its kernel then, once)
        if forced:
            os.environ[_OPENBLAS_CORETYPE] = forced
        else:
            os.environ.pop(_OPENBLAS_CORETYPE, None)
        package = importlib.import_module(OWN_BLAS_PACKAGE)
        path = os.path.join(package.get_lib_dir(), package.get_library(fullname=True))
        library = ctypes.CDLL(path)
        library.scipy_cblas_sgemm  # noqa: B018  # (the symbols the kernels bind)
    except (ImportError, OSError, AttributeError, IndexError):
        return None
    finally:
        if machine_wide is None:
            os.environ.pop(_OPENBLAS_CORETYPE, None)
        else:
            os.environ[_OPENBLAS_CORETYPE] = machine_wide
    return library


def blas_core(library: ctypes.CDLL) -> str:
    """The kernel an OpenBLAS library runs (``SkylakeX``, ``Haswell``, ...), ``"unknown"`` when
    it does not say."""
    function = getattr(library, "scipy_openblas_get_corename", None)
    if function is None:
        return "unknown"
    function.restype = ctypes.c_char_p
    return (function() or b"unknown").decode()


def _products_agree(library: ctypes.CDLL) -> bool:
    """Whether the library's ``sgemm`` and ``dgemm`` compute products right, on one thread (as
    the kernels call it): every pair of transposes, sizes that are no multiple of a kernel's
    block and, with leading dimensions longer than the columns (strided views, as the kernels
    pass), one whose sum takes several of OpenBLAS's blocks; against NumPy's float64 product
    (its own BLAS, loaded as the machine says)."""
    import numpy as np

    rng = np.random.default_rng(0)
    pointer = ctypes.c_void_p
    get_threads = getattr(library, "scipy_openblas_get_num_threads", None)
    set_threads = getattr(library, "scipy_openblas_set_num_threads", None)
    before = get_threads() if get_threads is not None else None
    if set_threads is not None:
        set_threads(1)

    def column_major(rows: int, cols: int, pad: int, dtype: type) -> tuple[Any, Any]:
        store: Any = rng.uniform(-1, 1, (cols, rows + pad)).astype(dtype)
        return store, store[:, :rows].T  # the buffer BLAS reads, the matrix in it (a view)

    try:
        for dtype, function, scalar, rtol in (
            (np.float32, library.scipy_cblas_sgemm, ctypes.c_float, 1e-4),
            (np.float64, library.scipy_cblas_dgemm, ctypes.c_double, 1e-12),
        ):
            shapes = ((37, 29, 67, 0), (97, 83, 520, 3))
            for (m, n, k, pad), ta, tb in itertools.product(shapes, (0, 1), (0, 1)):
                # C (m x n) = 0.5 op(A) op(B) + 2 C, op(A) m x k, op(B) k x n, column-major
                store_a, a = column_major(*((k, m) if ta else (m, k)), pad, dtype)
                store_b, b = column_major(*((n, k) if tb else (k, n)), pad, dtype)
                store_c, c = column_major(m, n, pad, dtype)
                op_a, op_b = (a.T if ta else a), (b.T if tb else b)
                want = 0.5 * (op_a.astype(float) @ op_b.astype(float)) + 2.0 * c.astype(float)
                function(102, 112 if ta else 111, 112 if tb else 111, m, n, k, scalar(0.5),
                         pointer(store_a.ctypes.data), store_a.shape[1],
                         pointer(store_b.ctypes.data), store_b.shape[1], scalar(2.0),
                         pointer(store_c.ctypes.data), store_c.shape[1])
                if not np.all(np.abs(c - want) <= rtol * (np.abs(want).max() + 1.0)):
                    return False
        return True
    finally:
        if set_threads is not None and before is not None:
            set_threads(before)


@functools.cache
def kernel_blas() -> tuple[Any, ...]:
    """threadpoolctl's controllers of the BLAS that generated kernels call (:func:`own_blas`,
    else SciPy's OpenBLAS through Numba's ``numba_xxgemm``; loaded here if it was not yet),
    usually one.  Found once (scanning the loaded libraries is the slow part); a controller
    reads and sets the library's thread count live."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a dependency
        return ()
    own = own_blas()
    if own is not None:
        path = os.path.realpath(str(own._name))
        return tuple(
            lib
            for lib in ThreadpoolController().lib_controllers
            if lib.user_api == "blas" and os.path.realpath(lib.filepath) == path
        )
    try:
        import scipy
        import scipy.linalg.cython_blas  # (loads the library, as Numba would)
    except ImportError:  # pragma: no cover - a dependency
        return ()
    root = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy")
    return tuple(
        lib
        for lib in ThreadpoolController().lib_controllers
        if lib.user_api == "blas" and lib.filepath.startswith(root)
    )


def limit_blas() -> None:
    """Run the BLAS that generated kernels call on one thread per call: symgrad's kernels split
    GEMMs over Numba's threads themselves.  That BLAS is symgrad's own copy of OpenBLAS
    (:func:`own_blas`): NumPy's and SciPy's BLAS are left as they are.  (Without it, SciPy's
    OpenBLAS: the process's ``scipy.linalg`` calls then run on one thread too while the pool is
    on; threadpoolctl's ``threadpool_limits`` gives them threads for a block.)"""
    for lib in kernel_blas():
        lib.set_num_threads(1)


def _running_layer() -> str | None:
    """The threading layer Numba runs (starting it, as the first parallel kernel would); None
    when the layer asked for does not load."""
    try:
        numba.get_num_threads()
        return str(numba.threading_layer())
    except ValueError:  # e.g. NUMBA_THREADING_LAYER=tbb without TBB
        return None


def _why_no_pool() -> str | None:
    """Why the pool does not start by default (None: it does).  It starts on Numba's TBB layer,
    which takes launches from several Python threads at once — the workqueue layer aborts the
    process then, and the OpenMP layer shares its thread count with torch's — and when the BLAS
    the kernels call is found (to run it on one thread: a pool of threads each calling a
    threaded BLAS would oversubscribe the cores)."""
    layer = _running_layer()
    if layer is None:
        return "the threading layer NUMBA_THREADING_LAYER names does not load"
    if layer != "tbb":
        if _TBB_PROBLEM is not None:
            return f"Numba runs its {layer} layer: {_TBB_PROBLEM}"
        return (f"Numba runs its {layer} layer (chosen by a parallel function run before "
                "symgrad's first kernel, or by Numba's configuration)")
    if not kernel_blas():
        return "the BLAS symgrad's kernels call (its own OpenBLAS, or SciPy's) was not found"
    return None


def pool_by_default() -> bool:
    """Whether symgrad's pool starts without being asked for (see :func:`_why_no_pool`).
    Otherwise kernels run serially, the BLAS with its own threads, until
    :func:`set_num_threads` or ``SYMGRAD_NUM_THREADS`` asks for the pool."""
    return _why_no_pool() is None


def configure() -> None:
    """Start symgrad's pool (once per process): kernels on ``SYMGRAD_NUM_THREADS`` threads
    (capped at the pool's size), or on every core the process may use
    (:func:`pool_by_default`; a :class:`~symgrad.errors.ThreadPoolWarning` says why not where
    the ``tbb`` wheel is a dependency); BLAS on one thread in them."""
    global _configured
    if _configured:
        return
    _configured = True
    wanted = _from_env()
    if wanted is not None:
        _use_pool(min(wanted, max_threads()))
        return
    why = _why_no_pool()
    if why is None:
        _use_pool(int(numba.get_num_threads()))
    elif _TBB_IS_A_DEPENDENCY and os.environ.get("NUMBA_THREADING_LAYER") is None:
        warnings.warn(
            f"symgrad's thread pool is off: {why}. Kernels run serially (the BLAS with its own "
            "threads); SYMGRAD_NUM_THREADS=n or symgrad.set_num_threads(n) starts the pool.",
            ThreadPoolWarning,
            stacklevel=2,
        )


def _use_pool(n: int) -> None:
    """From now on: kernels on symgrad's pool of ``n`` threads, BLAS single-threaded in them."""
    global _pool
    if not _pool:
        limit_blas()
        _pool = True
    numba.set_num_threads(n)


def set_num_threads(n: int) -> None:
    """Run symgrad's kernels on ``n`` threads (in the calling thread, as Numba's setting is).

    Results do not depend on ``n``: the same bits on 1 thread as on many.
    """
    configure()
    _use_pool(_check(n))


def get_num_threads() -> int:
    """The number of threads symgrad's kernels run on in the calling thread."""
    configure()
    return int(numba.get_num_threads())


@contextmanager
def _calling_thread(n: int) -> Iterator[None]:
    """Numba's thread count of the calling thread ``n`` inside, as it was after (also when
    the block raises)."""
    before = int(numba.get_num_threads())
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """``with num_threads(n):`` kernels run on ``n`` threads inside, the calling thread's
    setting is restored after (also when the block raises).  Like :func:`set_num_threads` it
    starts symgrad's pool for the process if it was off (:func:`serial` does not)."""
    configure()
    with _calling_thread(_check(n)):
        _use_pool(n)
        yield


@contextmanager
def serial() -> Iterator[None]:
    """``with serial():`` the calling thread's kernels run their serial variants inside (the
    same bits as on any number of threads), the pool left as it is — on or off."""
    configure()
    with _calling_thread(1):
        yield


def use_parallel(work: int) -> bool:
    """Whether work of ``work`` elements runs its parallel variant: when it is large enough
    and more than one thread may run it.  Either variant gives the same result."""
    if work < PARALLEL_MIN_WORK:
        return False
    configure()
    return _pool and int(numba.get_num_threads()) > 1
