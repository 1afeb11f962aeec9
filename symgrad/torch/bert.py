"""The PyTorch twin of the SMS spam fine-tuning model: Hugging Face's ``BertModel`` with the
pretrained all-MiniLM-L6-v2 weights, mean pooling over the attention mask (as
sentence-transformers pools) and a linear head.

The encoder is built offline from the ``config.json`` and ``model.safetensors`` that
:func:`symgrad.tasks.sms.minilm_files` locates — the same arrays symgrad's own encoder loads —
never from the Hugging Face hub.  The pooler weights of the file are not used (mean pooling
replaces it), so the encoder is built without a pooler.

Attention defaults to ``"eager"`` (softmax(QKᵀ/√d + mask)·V written out in torch ops, the
formula symgrad derives), not transformers' default ``"sdpa"``: eager is the reference that
symgrad's encoder mirrors.  The two agree to 1e-15 in float64, and sdpa is ~20 % faster on
the CPU in float32 — pass ``attn_implementation="sdpa"`` for timing runs.  Dropout is off by
default (``dropout=False``) because symgrad's encoder does not model it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import SymgradError
from ..tasks.sms import load_minilm_config, load_minilm_weights

__all__ = ["MiniLMClassifier", "freeze_below", "mean_pool", "minilm_twin"]

_UNUSED = ("pooler.", "embeddings.position_ids")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, N)`` hidden states → ``(B, N)``: the mean over the unmasked tokens."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class MiniLMClassifier(torch.nn.Module):
    """``head(mean_pool(encoder(input_ids, attention_mask)))`` — logits ``(B, n_classes)``."""

    def __init__(self, encoder: Any, head: torch.nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence embedding ``(B, 384)`` (not L2-normalised, unlike sentence-transformers'
        last module)."""
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        )
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(input_ids, attention_mask))


def minilm_twin(
    dtype: torch.dtype = torch.float32,
    n_classes: int = 2,
    seed: int = 0,
    *,
    attn_implementation: str = "eager",
    dropout: bool = False,
) -> MiniLMClassifier:
    """all-MiniLM-L6-v2 with a fresh ``Linear(384, n_classes)`` head (torch's default init,
    drawn from a generator seeded with ``seed``), in ``dtype``, in eval mode."""
    import transformers

    if dtype not in (torch.float32, torch.float64):
        raise SymgradError(f"the twin runs in torch.float32 or torch.float64, not {dtype}")
    config = load_minilm_config()
    if not dropout:
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config["attn_implementation"] = attn_implementation
    encoder: Any = transformers.BertModel(
        transformers.BertConfig(**config), add_pooling_layer=False
    )
    weights = load_minilm_weights(np.float32)
    state = {k: torch.from_numpy(v) for k, v in weights.items() if not k.startswith(_UNUSED)}
    encoder.load_state_dict(state, strict=True)  # every name and shape checked
    encoder.to(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(config["hidden_size"], n_classes, dtype=dtype)
    return MiniLMClassifier(encoder, head).eval()


def freeze_below(model: MiniLMClassifier, n_trainable_layers: int) -> list[torch.nn.Parameter]:
    """Freeze the embeddings and all but the top ``n_trainable_layers`` encoder layers; the head
    stays trainable.  Returns the trainable parameters."""
    layers = model.encoder.encoder.layer
    if not 0 <= n_trainable_layers <= len(layers):
        raise SymgradError(f"n_trainable_layers must be in [0, {len(layers)}]")
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for layer in layers[len(layers) - n_trainable_layers :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]
