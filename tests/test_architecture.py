"""The package's imports point one way down the pipeline (DESIGN.md), read from the source.

Stages, earliest first; a module may import its own stage and earlier ones, never a later one —
at module level or inside a function.  The symbolic stages import neither Numba nor torch, and
only ``symgrad.torch`` (PyTorch twins, interop), ``symgrad.distributed`` (torch.distributed) and the
benchmark and application modules import torch at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "symgrad"

#: stage of each top-level module or package of symgrad, in pipeline order
STAGES: list[set[str]] = [
    {"_version", "errors"},
    {"symbolic", "builtins"},  # formulas: specs, derivation, stabilization, residuals
    {"codegen"},  # lowering and emitting source
    {"runtime"},  # cache, compiled op wrappers, BLAS
    {"api", "functional"},  # the front end: formula in, compiled op out
    {"nn"},  # modules, losses, the tape
    {"optim"},  # optimizers as update rules, schedulers
    {"compile"},  # the step compiler
    {"train"},  # the training loop
    {"distributed"},  # data-parallel training over torch.distributed
    # applications: printouts, the fine-tuning tasks, torch twins, benchmarks, the CLI
    {"explain", "tasks", "torch", "bench", "bench_encoder", "cli", "__main__", "__init__"},
]
STAGE = {name: n for n, names in enumerate(STAGES) for name in names}

#: The one import of a later stage, on purpose: a derivation renders itself (``to_text``,
#: ``to_latex``, ``to_markdown``) through ``symgrad.explain``, imported when a printout is asked
#: for — a view of the data, never needed to derive, compile or run anything.
ALLOWED = {("symbolic/derive.py", "explain")}

#: Below the applications, only data-parallel training imports torch: torch.distributed is its
#: communication layer (process group, all-reduce).
TORCH_BELOW = {"distributed"}


def _stage_of(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(top-level symgrad module, line)`` of every import of the package in ``path``, and
    ``("!" + name, line)`` for numba and torch."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(ROOT).parent.parts
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package)[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
                if not target:  # from . import x at the top of the package
                    target = [alias.name for alias in node.names][:1]
                found.append((target[0], node.lineno))
            elif node.module and node.module.split(".")[0] == "symgrad":
                parts = node.module.split(".")
                found.append((parts[1] if len(parts) > 1 else node.names[0].name, node.lineno))
            elif node.module and node.module.split(".")[0] in ("numba", "torch"):
                found.append(("!" + node.module.split(".")[0], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in ("numba", "torch"):
                    found.append(("!" + top, node.lineno))
    return found


def _files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


def _own_stage(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_pipeline(path: Path) -> None:
    own = _own_stage(path)
    assert own in STAGE, f"{path.relative_to(ROOT)}: add its stage to STAGES"
    rel = path.relative_to(ROOT).as_posix()
    for target, line in _imports(path):
        if target.startswith("!"):
            lib = target[1:]
            if own == "symbolic":
                pytest.fail(f"{rel}:{line} imports {lib}: the symbolic stage imports neither")
            if lib == "torch" and STAGE[own] < STAGE["explain"] and own not in TORCH_BELOW:
                pytest.fail(f"{rel}:{line} imports torch below the application stage")
            continue
        if target not in STAGE or (rel, target) in ALLOWED:
            continue
        assert STAGE[target] <= STAGE[own], (
            f"{rel}:{line} imports symgrad.{target} (stage {STAGE[target]}) from stage "
            f"{STAGE[own]} ({own}): imports must point down the pipeline"
        )


def test_every_stage_is_listed() -> None:
    names = {_own_stage(p) for p in _files()}
    assert names <= set(STAGE), sorted(names - set(STAGE))
