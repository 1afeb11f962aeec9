"""A GPT-2-style decoder block (pre-LN, causal self-attention, tanh-GELU MLP) from derived ops.

``y = h + c_proj(gelu_tanh(c_fc(LN₂(h))))`` with ``h = x + c_proj(attention(LN₁(x)))``, the
attention causal: query ``s`` sees the keys ``t ≤ s``.  Every op is a built-in index formula
(``symgrad.TENSOR_BUILTINS``) or elementwise formula: ``layer_norm``, ``head_projection``,
``attention_scores``, ``causal_softmax`` (the causal mask is the index condition ``t ≤ s``),
``attention_context``, ``head_merge``, ``add``, ``seq_linear``, ``gelu_tanh``.  The block
records them on a :class:`~symgrad.nn.Tape`, so the tape's reverse mode and the step compiler
(:func:`symgrad.compile.compile_step`) both take it; no gradient is written by hand.

The torch layout is nanoGPT's ``Block`` (:class:`symgrad.torch.gpt.GPTBlockTwin`): ``ln_1``,
``attn.c_attn`` (the query, key and value projections in one ``(3N, N)`` linear layer),
``attn.c_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``.  The block keeps the query, key and
value weights per head — ``(H, M, N)`` for torch's ``(H·M, N)`` rows, the same memory order —
and the attention output weight as ``(N, H, M)``, so no activation is ever reshaped;
:meth:`GPTBlock.load_torch` and :meth:`GPTBlock.torch_state_dict` convert.  Dropout is not
modelled.

>>> import numpy as np
>>> from symgrad.nn import GPTBlock
>>> block = GPTBlock(8, 2, dtype=np.float64, rng=np.random.default_rng(0))
>>> sorted(block.torch_state_dict())[:3]
['attn.c_attn.bias', 'attn.c_attn.weight', 'attn.c_proj.bias']
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import DTypeError, ShapeError
from .modules import Module, Parameter, StateDictError, _builtin, _check_dtype
from .tape import Tape

_OPS = (
    "head_projection",
    "attention_scores",
    "causal_softmax",
    "attention_context",
    "head_merge",
    "add",
    "seq_linear",
    "gelu_tanh",
)


class GPTBlock(Module):
    """A pre-LN decoder block: ``x`` ``(B, T, N)`` → ``(B, T, N)``.

    Args:
        hidden_size: ``N``, the model width (nanoGPT's ``n_embd``).
        num_heads: ``H``; ``N`` must be a multiple of it (heads of ``M = N / H`` features).
        intermediate_size: the MLP's width (default ``4N``, as GPT-2).
        eps: the layer norms' ε (torch's default, 1e-5, as GPT-2).
        dtype: float32 or float64.
        rng: initialises as GPT-2 does: weights ``N(0, 0.02²)``, biases 0, layer norms 1 and 0.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int | None = None,
        *,
        eps: float = 1e-5,
        dtype: Any = np.float32,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__()
        n, h = int(hidden_size), int(num_heads)
        if n < 1 or h < 1 or n % h:
            raise ShapeError(
                f"GPTBlock: hidden_size {hidden_size} must be a positive multiple of num_heads "
                f"{num_heads}"
            )
        i = 4 * n if intermediate_size is None else int(intermediate_size)
        if i < 1:
            raise ShapeError(f"GPTBlock: intermediate_size must be positive, got {i}")
        m = n // h
        self.hidden_size, self.num_heads, self.head_size, self.intermediate_size = n, h, m, i
        self.eps = float(eps)
        self.dtype = _check_dtype(dtype)
        rng = rng if rng is not None else np.random.default_rng()

        def normal(*shape: int) -> Parameter:
            return Parameter((0.02 * rng.normal(size=shape)).astype(self.dtype))

        def const(value: float, *shape: int) -> Parameter:
            return Parameter(np.full(shape, value, dtype=self.dtype))

        self._params: dict[str, Parameter] = {
            "ln_1.weight": const(1.0, n),
            "ln_1.bias": const(0.0, n),
            "attn.query.weight": normal(h, m, n),
            "attn.query.bias": const(0.0, h, m),
            "attn.key.weight": normal(h, m, n),
            "attn.key.bias": const(0.0, h, m),
            "attn.value.weight": normal(h, m, n),
            "attn.value.bias": const(0.0, h, m),
            "attn.c_proj.weight": normal(n, h, m),
            "attn.c_proj.bias": const(0.0, n),
            "ln_2.weight": const(1.0, n),
            "ln_2.bias": const(0.0, n),
            "mlp.c_fc.weight": normal(i, n),
            "mlp.c_fc.bias": const(0.0, i),
            "mlp.c_proj.weight": normal(n, i),
            "mlp.c_proj.bias": const(0.0, n),
        }
        self._built: dict[str, Any] | None = None

    @property
    def _op(self) -> dict[str, Any]:
        """The block's ops, built on first use (a warm compiled step loads no SymPy)."""
        if self._built is None:
            ops = {name: _builtin(name) for name in _OPS}
            ops["layer_norm"] = _builtin("layer_norm", eps=self.eps)
            self._built = ops
        return self._built

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, p in self._params.items():
            yield prefix + name, p

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"intermediate_size={self.intermediate_size}, eps={self.eps}"
        )

    def record(self, tape: Tape, *inputs: np.ndarray) -> np.ndarray:
        """``(x,)`` → the block's output, every op recorded on ``tape``."""
        (x,) = self._inputs(inputs, 1)
        return self.apply(tape, x)

    def apply(self, tape: Tape, x: np.ndarray) -> np.ndarray:
        """``x`` ``(B, T, N)`` → ``(B, T, N)``, recorded on ``tape``."""
        if not isinstance(x, np.ndarray) or x.ndim != 3 or x.shape[2] != self.hidden_size:
            shape = getattr(x, "shape", None)
            raise ShapeError(
                f"GPTBlock({self.hidden_size}) takes x of shape (batch, tokens, "
                f"{self.hidden_size}), got {shape}"
            )
        if x.dtype != self.dtype:
            raise DTypeError(
                f"GPTBlock has {self.dtype} weights but x is {x.dtype}; pass "
                f"x.astype(np.{self.dtype})"
            )
        p, op = self._params, self._op

        def affine(name: str, prefix: str, a: np.ndarray) -> np.ndarray:
            return tape.apply(op[name], a, p[f"{prefix}.weight"], p[f"{prefix}.bias"])

        a = tape.apply(op["layer_norm"], x, p["ln_1.weight"], p["ln_1.bias"])
        q, k, v = (
            affine("head_projection", f"attn.{part}", a) for part in ("query", "key", "value")
        )
        scores = tape.apply(op["attention_scores"], q, k)  # (B, H, T, T), scaled by 1/√M
        probs = tape.apply(op["causal_softmax"], scores)  # key t for queries s ≥ t only
        context = tape.apply(op["attention_context"], probs, v)  # (B, T, H, M)
        h = tape.apply(op["add"], x, affine("head_merge", "attn.c_proj", context))
        b = tape.apply(op["layer_norm"], h, p["ln_2.weight"], p["ln_2.bias"])
        inner = tape.apply(op["gelu_tanh"], affine("seq_linear", "mlp.c_fc", b))
        return tape.apply(op["add"], h, affine("seq_linear", "mlp.c_proj", inner))

    # -- torch (nanoGPT) weights -------------------------------------------------------------

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """The parameters in nanoGPT's ``Block`` names and shapes (query, key and value in
        ``attn.c_attn``; every weight ``(out_features, in_features)``), copies."""
        p = {name: param.data for name, param in self._params.items()}
        n = self.hidden_size
        parts = ("query", "key", "value")
        out = {
            "ln_1.weight": p["ln_1.weight"],
            "ln_1.bias": p["ln_1.bias"],
            "attn.c_attn.weight": np.concatenate(
                [p[f"attn.{s}.weight"].reshape(n, n) for s in parts]
            ),
            "attn.c_attn.bias": np.concatenate([p[f"attn.{s}.bias"].reshape(n) for s in parts]),
            "attn.c_proj.weight": p["attn.c_proj.weight"].reshape(n, n),
            "attn.c_proj.bias": p["attn.c_proj.bias"],
            **{k: v for k, v in p.items() if k.startswith(("ln_2.", "mlp."))},
        }
        return {k: np.array(v, copy=True) for k, v in out.items()}

    def load_torch(self, state: Mapping[str, Any]) -> None:
        """Load nanoGPT ``Block`` weights (NumPy arrays or torch tensors); every name and shape
        is checked before anything is written."""
        arrays = {
            k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
            for k, v in state.items()
        }
        want = {k: v.shape for k, v in self.torch_state_dict().items()}
        missing, unexpected = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
        if missing or unexpected:
            raise StateDictError(
                f"GPTBlock weights do not match: missing {missing}, unexpected {unexpected}"
            )
        for name, shape in want.items():
            if arrays[name].shape != shape:
                raise StateDictError(
                    f"{name}: the weights have shape {arrays[name].shape}, the block needs {shape}"
                )
        qkv_w = np.split(arrays["attn.c_attn.weight"], 3)
        qkv_b = np.split(arrays["attn.c_attn.bias"], 3)
        mine = dict(arrays)
        for s, w, c in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            mine[f"attn.{s}.weight"], mine[f"attn.{s}.bias"] = w, c
        del mine["attn.c_attn.weight"], mine["attn.c_attn.bias"]
        for name, param in self._params.items():  # per head: the same memory order
            param.data = np.ascontiguousarray(mine[name].reshape(param.shape), dtype=self.dtype)
