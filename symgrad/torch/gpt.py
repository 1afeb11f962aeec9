"""The PyTorch twin of :class:`symgrad.nn.GPTBlock`: nanoGPT's ``Block`` (pre-LN, causal
self-attention through ``scaled_dot_product_attention(is_causal=True)``, tanh-GELU MLP), no
dropout.  Its ``state_dict`` is what :meth:`~symgrad.nn.GPTBlock.torch_state_dict` gives and
:meth:`~symgrad.nn.GPTBlock.load_torch` takes."""

from __future__ import annotations

import torch

__all__ = ["GPTBlockTwin"]


class _Attention(torch.nn.Module):
    def __init__(self, n: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = torch.nn.Linear(n, 3 * n)
        self.c_proj = torch.nn.Linear(n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n = x.shape
        q, k, v = (
            part.view(b, t, self.heads, n // self.heads).transpose(1, 2)
            for part in self.c_attn(x).split(n, dim=2)
        )
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, n))


class _MLP(torch.nn.Module):
    def __init__(self, n: int, inner: int) -> None:
        super().__init__()
        self.c_fc = torch.nn.Linear(n, inner)
        self.gelu = torch.nn.GELU(approximate="tanh")
        self.c_proj = torch.nn.Linear(inner, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class GPTBlockTwin(torch.nn.Module):
    """``x + attn(ln_1(x))``, then ``+ mlp(ln_2(·))``; ``x`` ``(B, T, N)``."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int | None = None,
        eps: float = 1e-5,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        inner = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.ln_1 = torch.nn.LayerNorm(hidden_size, eps=eps)
        self.attn = _Attention(hidden_size, num_heads)
        self.ln_2 = torch.nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = _MLP(hidden_size, inner)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))
