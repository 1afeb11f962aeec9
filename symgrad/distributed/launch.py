"""``symgrad finetune --nproc N``: the same command under ``torchrun`` on this machine.

:func:`launch` runs ``python -m torch.distributed.run --standalone --nproc-per-node N -m symgrad
ARGS`` — torchrun itself, with a rendezvous on a free local port — and returns its exit status.
Several machines are started with torchrun directly (README: "Data-parallel training").
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from .group import SetupError, launched


def torchrun_command(nproc: int, args: Sequence[str], module: str = "symgrad") -> list[str]:
    """The torchrun command line that runs ``python -m module *args`` on ``nproc`` ranks."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *args,
    ]


def launch(nproc: int, args: Sequence[str], module: str = "symgrad") -> int:
    """Run ``python -m module *args`` on ``nproc`` local ranks under torchrun; its exit code.

    Each rank gets one thread for NumPy/Numba/torch unless the environment says otherwise
    (``OMP_NUM_THREADS``, ``NUMBA_NUM_THREADS``): ``nproc`` ranks share the machine's cores.
    """
    if nproc < 1:
        raise SetupError(f"--nproc must be at least 1, got {nproc}")
    if launched():
        raise SetupError(
            "--nproc inside a torchrun job: torchrun already started the ranks; drop --nproc"
        )
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.setdefault(name, "1")
    return subprocess.call(torchrun_command(nproc, args, module), env=env)
