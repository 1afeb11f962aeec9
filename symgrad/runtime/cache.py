"""The on-disk kernel cache: generated modules, verified, imported, compiled by Numba.

Layout: ``<cache dir>/<op name>_<digest>.py``, one module per op, where ``digest`` hashes the
op's spec key with the *toolchain fingerprint* (symgrad's version, the source files of its code
generators, and the versions of SymPy, NumPy, Numba and llvmlite) — a change to any of them names
a new file, so a stale kernel is never picked up.  Numba's own cache (``njit(cache=True)``) sits
beside it in ``__pycache__``.

Every file carries the sha256 of its body in its header, and the spec key of its op; a file whose
body does not match (torn write, disk corruption, a hand edit), or that belongs to another op, is
rewritten, never trusted.  The check runs where a module is *imported*, and the module is
executed from the very text that was checked (:func:`ensure_imported`), so a file changed or
deleted after an op was defined is regenerated, not run.  Files are written to a temporary name
and renamed into place (atomic on POSIX), so two processes compiling the same op at once both
succeed; a temporary file left by a killed writer is removed by the next write.

A read-only cache is usable as long as it holds verified files: only writing needs a writable
directory.  A failure to write (no space left, no permission, a directory where a file should
be) is a :class:`~symgrad.errors.CacheError` naming the path and the cause.  The directory is
``$SYMGRAD_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/symgrad`` (``~/.cache/symgrad``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from .._version import __version__
from ..errors import CacheError

_HEADER_HASH = re.compile(r"^# body-sha256 ([0-9a-f]{64})$", re.MULTILINE)
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
#: The parts of symgrad that write generated source, or that generated source calls: a change
#: to any of them names new files.
#: Everything else (wrappers, networks, the CLI) does not change what a kernel computes, so
#: editing it keeps the cache warm.
_GENERATORS = ("symbolic", "codegen", "compile", "runtime/blas.py")


def cache_dir() -> Path:
    """The kernel cache directory (created if missing; it may be read-only)."""
    env = os.environ.get("SYMGRAD_CACHE_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "symgrad"
    if not path.is_dir():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(
                f"cannot create the kernel cache directory {path}: {_cause(err)}. Point "
                "SYMGRAD_CACHE_DIR at a writable directory"
            ) from err
    return path


def _cause(err: OSError) -> str:
    """``err``'s reason without the path (messages name the path themselves)."""
    return err.strerror or type(err).__name__


@lru_cache(maxsize=1)
def toolchain_fingerprint() -> str:
    """A hash of everything besides the spec that shapes a compiled kernel: the versions of
    symgrad and of the libraries it generates code with, and the source of its generators."""
    import llvmlite
    import numba
    import numpy

    digest = hashlib.sha256()
    for part in (
        __version__,
        _sympy_version(),
        numpy.__version__,
        numba.__version__,
        llvmlite.__version__,
    ):
        digest.update(part.encode() + b"\0")
    for file in _generator_files():
        digest.update(file.relative_to(_PACKAGE_ROOT).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _generator_files() -> list[Path]:
    files: list[Path] = []
    for part in _GENERATORS:
        path = _PACKAGE_ROOT / part
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
    return files


def _sympy_version() -> str:
    """SymPy's version without importing SymPy (half a second a warm start need not spend)."""
    found = importlib.util.find_spec("sympy")
    if found is not None and found.origin is not None:
        release = Path(found.origin).parent / "release.py"
        match = re.search(r"__version__ = ['\"]([^'\"]+)['\"]", release.read_text())
        if match:
            return match.group(1)
    from importlib.metadata import version

    return version("sympy")


def module_path(name: str, key: str) -> Path:
    """Where the module of op ``name`` with spec ``key`` lives in the cache."""
    digest = hashlib.sha256(f"{key}|{toolchain_fingerprint()}".encode()).hexdigest()[:24]
    return cache_dir() / f"{name}_{digest}.py"


def verified_text(path: Path, key: str | None = None) -> str | None:
    """The file's text if its body matches the hash in its header (and, given ``key``, the
    header names that spec), else None."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    match = _HEADER_HASH.search(text)
    if match is None:
        return None
    if key is not None and f"; spec {key}\n" not in text[: match.start()]:
        return None
    body = text[match.end() + 1 :]
    if hashlib.sha256(body.encode()).hexdigest() != match.group(1):
        return None
    return text


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place.

    Temporary files of ``path`` left by a killed writer are removed first; any failure (no
    space, no permission, a directory in the way) is a :class:`CacheError` naming the path.
    """
    for stale in path.parent.glob(f".{path.stem}.*.tmp"):
        if time.time() - _mtime(stale) > _STALE_SECONDS:  # not a live writer's
            with contextlib.suppress(OSError):
                stale.unlink()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is readable like any source
        os.replace(tmp, path)
    except OSError as err:
        raise CacheError(
            f"cannot write {path} in the kernel cache: {_cause(err)}. Free some space, make "
            "the directory writable, or point SYMGRAD_CACHE_DIR at another directory"
        ) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


#: A temporary file older than this is a killed writer's, not a live one's.
_STALE_SECONDS = 600.0


def write_source(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` unless a verified identical copy is already there.

    A file that fails verification is replaced, and Numba's cached binaries of it dropped.
    """
    if verified_text(path) == text:
        return
    if path.exists() or path.is_symlink():
        purge_compiled(path)
    atomic_write(path, text)


def purge_compiled(path: Path) -> None:
    """Delete Numba's cached binaries (index and data files) of the module at ``path``."""
    pycache = path.parent / "__pycache__"
    if pycache.is_dir():
        for item in pycache.glob(f"{path.stem}.*"):
            with contextlib.suppress(FileNotFoundError):
                item.unlink()


def import_module(path: Path, text: str) -> ModuleType:
    """Import the generated module ``text`` (read and verified from ``path``) under a unique
    private name, executing that text — not whatever the file holds by now."""
    name = f"_symgrad_kernels_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:  # pragma: no cover - a .py path always has one
        raise CacheError(f"cannot import the generated module {path}")
    module = importlib.util.module_from_spec(spec)
    code = compile(text, str(path), "exec")
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def ensure_imported(path: Path, text: str | None = None) -> ModuleType:
    """The generated module at ``path``, imported once per process from verified text.

    ``text`` is the file's verified text if the caller has it; otherwise it is read and
    verified here, and a file that fails is a :class:`CacheError` (callers that can regenerate
    the file verify it first).
    """
    module = sys.modules.get(f"_symgrad_kernels_{path.stem}")
    if module is not None:
        return module
    if text is None:
        text = verified_text(path)
        if text is None:
            raise CacheError(
                f"the generated module {path} is missing or fails verification; "
                "`symgrad cache clear` and run again"
            )
    return import_module(path, text)


def clear_cache() -> int:
    """Delete every cached kernel; returns the number of modules removed."""
    root = cache_dir()
    count = 0
    try:
        for file in root.glob("*.py"):
            file.unlink()
            count += 1
        for manifest in [*root.glob("*_manifest_*.json"), *root.glob("op_*.json")]:
            manifest.unlink()  # manifests and op records name modules just deleted
    except OSError as err:
        raise CacheError(f"cannot clear the kernel cache {root}: {_cause(err)}") from err
    shutil.rmtree(root / "__pycache__", ignore_errors=True)
    return count
