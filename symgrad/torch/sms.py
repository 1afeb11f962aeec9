"""The PyTorch side of the MiniLM fine-tuning task: Hugging Face's ``BertModel`` trained on the
same batches as symgrad's encoder, with the same frozen-output caching (see
:mod:`symgrad.tasks.minilm`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .bert import freeze_below, mean_pool, minilm_twin

_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class TwinRunner:
    """all-MiniLM-L6-v2 + head in torch, the top ``trained`` layers and the head trainable."""

    def __init__(self, head: dict[str, np.ndarray], dtype: Any, trained: int) -> None:
        self.dtype = _TORCH[np.dtype(dtype)]
        self.model = minilm_twin(self.dtype)
        with torch.no_grad():  # the same fresh head as symgrad's
            self.model.head.weight.copy_(torch.from_numpy(head["weight"]))
            self.model.head.bias.copy_(torch.from_numpy(head["bias"]))
        self.params = freeze_below(self.model, trained)
        self.head_params = list(self.model.head.parameters())
        heads = {id(p) for p in self.head_params}
        self.layer_params = [p for p in self.params if id(p) not in heads]
        self.layers = self.model.encoder.encoder.layer
        self.first = len(self.layers) - trained
        self.loss = torch.nn.CrossEntropyLoss()
        self.last_logits = np.empty((0, 2))

    def _mask(self, mask: np.ndarray) -> torch.Tensor:
        """The additive attention mask ``(B, 1, 1, T)``: 0 at tokens, the dtype's minimum at
        padding (as transformers builds it for eager attention)."""
        m = torch.from_numpy(mask).to(self.dtype)[:, None, None, :]
        return (1.0 - m) * torch.finfo(self.dtype).min

    @torch.no_grad()
    def cache(self, ids: np.ndarray, mask: np.ndarray) -> list[torch.Tensor]:
        """Per message of this batch: the pooled embedding (all layers frozen) or the hidden
        states entering the first trained layer, unpadded."""
        if self.first == 0:
            return [torch.empty(0)] * len(ids)
        out = self.model.encoder(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.zeros_like(torch.from_numpy(ids)),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[self.first]
        if self.first == len(self.layers):
            pooled = mean_pool(hidden, torch.from_numpy(mask))
            return list(pooled)
        return [hidden[row, : int(mask[row].sum())] for row in range(len(ids))]

    def pooled(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model.pooled(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    def logits(self, ids: np.ndarray, mask: np.ndarray, cached: list[torch.Tensor]) -> Any:
        if self.first == len(self.layers):
            return self.model.head(torch.stack(cached))
        if self.first == 0:
            return self.model(torch.from_numpy(ids), torch.from_numpy(mask))
        hidden = torch.zeros(len(ids), ids.shape[1], cached[0].shape[-1], dtype=self.dtype)
        for row, h in enumerate(cached):
            hidden[row, : len(h)] = h
        additive = self._mask(mask)
        for layer in self.layers[self.first :]:
            hidden = layer(hidden, attention_mask=additive)
        return self.model.head(mean_pool(hidden, torch.from_numpy(mask)))

    def step(self, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray, cached: Any) -> float:
        """One forward and backward; the batch's logits are kept in ``last_logits``."""
        logits = self.logits(ids, mask, cached)
        loss = self.loss(logits, torch.from_numpy(labels))
        loss.backward()
        self.last_logits = logits.detach().numpy()
        return float(loss.item())

    def evaluate(
        self, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray, cached: Any
    ) -> tuple[float, np.ndarray]:
        """``(summed cross-entropy, predictions)`` of one batch, without gradients."""
        with torch.no_grad():
            logits = self.logits(ids, mask, cached)
            loss = self.loss(logits, torch.from_numpy(labels))
        return float(loss.item()) * len(labels), logits.argmax(1).numpy()

    def predict(self, ids: np.ndarray, mask: np.ndarray, cached: Any) -> np.ndarray:
        with torch.no_grad():
            return self.logits(ids, mask, cached).argmax(1).numpy()

    def named_trainable(self) -> dict[str, np.ndarray]:
        """Trained weights (``encoder.``-less Hugging Face names, the head as ``head.*``)."""
        return {
            name.removeprefix("encoder."): p.detach().numpy().copy()
            for name, p in self.model.named_parameters()
            if p.requires_grad
        }

    def grads(self) -> dict[str, np.ndarray]:
        return {
            name.removeprefix("encoder."): p.grad.numpy().copy()
            for name, p in self.model.named_parameters()
            if p.requires_grad and p.grad is not None
        }
