"""The step compiler: a model's training step traced, planned and generated as one function.

Above :mod:`symgrad.nn` and :mod:`symgrad.optim` in the pipeline (DESIGN.md): it reads a
model's forward as recorded on a tape (:mod:`.graph`), plans the step (:mod:`.plan`) and
runs it (:mod:`.step`).
"""

from .graph import Graph, UnsupportedStepError, trace
from .step import CompiledStep, compile_step

__all__ = ["CompiledStep", "Graph", "UnsupportedStepError", "compile_step", "trace"]
