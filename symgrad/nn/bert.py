"""A BERT encoder (all-MiniLM-L6-v2 and its kind) from symgrad's derived tensor ops.

Every op is a built-in index formula (``symgrad.TENSOR_BUILTINS``): ``embedding`` (a gather,
whose derived gradient is a scatter-add), ``head_projection``, ``attention_scores``,
``masked_softmax``, ``attention_context``, ``head_merge``, ``seq_linear``, ``gelu``, ``add``,
``add_layer_norm``, ``masked_mean_pool``.  A layer records them on a :class:`~symgrad.nn.Tape`;
the backward pass is the tape composing their derived VJPs.

Parameters carry the Hugging Face names.  The query/key/value weights are stored per head —
``(H, M, N)`` for torch's ``(H·M, N)`` — and the attention output weight as ``(N, H, M)``, so
no activation is ever reshaped; :meth:`BertEncoder.load_hf` and :meth:`BertEncoder.hf_state_dict`
convert.  Dropout is not modelled: fine-tuning runs compare with torch in eval mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DTypeError, ShapeError
from .modules import Linear, Module, Parameter, StateDictError, _builtin, _check_dtype
from .tape import Tape


@dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder (the fields of a Hugging Face ``config.json``)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    num_hidden_layers: int = 6
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> BertConfig:
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise ShapeError(f"BertConfig: hidden_act {act!r} is not supported (only 'gelu')")
        names = cls.__dataclass_fields__
        return cls(**{k: config[k] for k in names if k in config})

    @property
    def head_size(self) -> int:
        if self.hidden_size % self.num_attention_heads:
            raise ShapeError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        return self.hidden_size // self.num_attention_heads


def _ops(eps: float) -> dict[str, Any]:
    names = [
        "embedding",
        "add",
        "head_projection",
        "attention_scores",
        "masked_softmax",
        "attention_context",
        "head_merge",
        "seq_linear",
        "gelu",
        "masked_mean_pool",
    ]
    ops = {n: _builtin(n) for n in names}
    ops["add_layer_norm"] = _builtin("add_layer_norm", eps=eps)
    return ops


def _param(shape: tuple[int, ...], dtype: np.dtype) -> Parameter:
    return Parameter(np.zeros(shape, dtype=dtype))


class _Block(Module):
    """A module whose parameters are a name → Parameter table (Hugging Face's dotted names)."""

    _params: dict[str, Parameter]

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, p in self._params.items():
            yield prefix + name, p


class BertLayer(_Block):
    """Self-attention with the padding mask, then the feed-forward block; post-norm."""

    def __init__(self, config: BertConfig, dtype: np.dtype) -> None:
        super().__init__()
        n, h, m, i = (
            config.hidden_size,
            config.num_attention_heads,
            config.head_size,
            config.intermediate_size,
        )
        self.config = config
        self._params = {
            "attention.self.query.weight": _param((h, m, n), dtype),
            "attention.self.query.bias": _param((h, m), dtype),
            "attention.self.key.weight": _param((h, m, n), dtype),
            "attention.self.key.bias": _param((h, m), dtype),
            "attention.self.value.weight": _param((h, m, n), dtype),
            "attention.self.value.bias": _param((h, m), dtype),
            "attention.output.dense.weight": _param((n, h, m), dtype),
            "attention.output.dense.bias": _param((n,), dtype),
            "attention.output.LayerNorm.weight": _param((n,), dtype),
            "attention.output.LayerNorm.bias": _param((n,), dtype),
            "intermediate.dense.weight": _param((i, n), dtype),
            "intermediate.dense.bias": _param((i,), dtype),
            "output.dense.weight": _param((n, i), dtype),
            "output.dense.bias": _param((n,), dtype),
            "output.LayerNorm.weight": _param((n,), dtype),
            "output.LayerNorm.bias": _param((n,), dtype),
        }
        self._op = _ops(config.layer_norm_eps)

    def record(self, tape: Tape, *inputs: np.ndarray) -> np.ndarray:
        """``(hidden, attention_mask)`` → the layer's output, recorded on ``tape`` (the mask of
        1s and 0s in the model's dtype, made additive by a recorded op)."""
        hidden, attention_mask = self._inputs(inputs, 2)
        dtype = self._params["output.dense.bias"].data.dtype
        mask = tape.apply(_mask_op(dtype), _float_mask(attention_mask, dtype))
        return self.apply(tape, hidden, mask)

    def apply(self, tape: Tape, hidden: np.ndarray, additive_mask: np.ndarray) -> np.ndarray:
        """``hidden`` ``(B, S, N)`` → ``(B, S, N)``; ``additive_mask`` ``(B, S)``: 0 at tokens,
        a large negative number at padding."""
        p, op = self._params, self._op

        def affine(name: str, prefix: str, x: np.ndarray) -> np.ndarray:
            return tape.apply(op[name], x, p[f"{prefix}.weight"], p[f"{prefix}.bias"])

        q, k, v = (
            affine("head_projection", f"attention.self.{part}", hidden)
            for part in ("query", "key", "value")
        )
        scores = tape.apply(op["attention_scores"], q, k)
        probs = tape.apply(op["masked_softmax"], scores, additive_mask)
        context = tape.apply(op["attention_context"], probs, v)
        attended = affine("head_merge", "attention.output.dense", context)
        h1 = tape.apply(
            op["add_layer_norm"],
            attended,
            hidden,
            p["attention.output.LayerNorm.weight"],
            p["attention.output.LayerNorm.bias"],
        )
        inner = tape.apply(op["gelu"], affine("seq_linear", "intermediate.dense", h1))
        out = affine("seq_linear", "output.dense", inner)
        return tape.apply(
            op["add_layer_norm"], out, h1, p["output.LayerNorm.weight"], p["output.LayerNorm.bias"]
        )


class BertEmbeddings(_Block):
    """Word + position + token-type embeddings (three gathers), then layer norm."""

    def __init__(self, config: BertConfig, dtype: np.dtype) -> None:
        super().__init__()
        n = config.hidden_size
        self.config = config
        self._params = {
            "word_embeddings.weight": _param((config.vocab_size, n), dtype),
            "position_embeddings.weight": _param((config.max_position_embeddings, n), dtype),
            "token_type_embeddings.weight": _param((config.type_vocab_size, n), dtype),
            "LayerNorm.weight": _param((n,), dtype),
            "LayerNorm.bias": _param((n,), dtype),
        }
        self._op = _ops(config.layer_norm_eps)

    def apply(self, tape: Tape, input_ids: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        p, op = self._params, self._op
        batch, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ShapeError(
                f"sequences of {length} tokens are longer than the model's "
                f"{self.config.max_position_embeddings} positions; truncate them"
            )
        positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
        words = tape.apply(op["embedding"], input_ids, p["word_embeddings.weight"])
        where = tape.apply(op["embedding"], positions, p["position_embeddings.weight"])
        kinds = tape.apply(op["embedding"], token_type_ids, p["token_type_embeddings.weight"])
        return tape.apply(
            op["add_layer_norm"],
            words,
            tape.apply(op["add"], where, kinds),
            p["LayerNorm.weight"],
            p["LayerNorm.bias"],
        )


def additive_mask(attention_mask: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """0 where ``attention_mask`` is 1, the dtype's most negative number where it is 0 (as
    Hugging Face's BERT): ``exp`` of a padded position's score is exactly 0."""
    return np.where(np.asarray(attention_mask) > 0, 0.0, np.finfo(dtype).min).astype(dtype)


def _mask_op(dtype: np.dtype) -> Any:
    """The ``additive_mask`` op of ``dtype``: ``(1 - m)·min``, recorded like any op."""
    return _builtin("additive_mask", fill=float(np.finfo(dtype).min))


class BertEncoder(Module):
    """Embeddings and ``num_hidden_layers`` layers; ``encode`` gives the last hidden states."""

    def __init__(self, config: BertConfig, dtype: Any = np.float32) -> None:
        super().__init__()
        self.config = config
        self.dtype = _check_dtype(dtype)
        self.embeddings = BertEmbeddings(config, self.dtype)
        # a tuple: layers are replaced by assigning a new tuple, which a compiled step notices
        self.layers = tuple(BertLayer(config, self.dtype) for _ in range(config.num_hidden_layers))

    def children(self) -> Iterator[tuple[str, Module]]:
        yield "embeddings", self.embeddings
        for n, layer in enumerate(self.layers):
            yield f"encoder.layer.{n}", layer

    def _check(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ShapeError(
                f"input_ids and attention_mask must both be (batch, length); got {ids.shape} "
                f"and {mask.shape}"
            )
        if mask.size and not np.all(mask.max(axis=1) > 0):
            raise ShapeError("every sequence needs at least one unmasked token")

    def encode(
        self,
        tape: Tape,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        layers: range | None = None,
        hidden: np.ndarray | None = None,
    ) -> np.ndarray:
        """Hidden states ``(B, S, N)`` after ``layers`` (default: all), starting from the
        embeddings, or from ``hidden`` (the output of the layer before ``layers.start``)."""
        self._check(input_ids, attention_mask)
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = tape.apply(_mask_op(self.dtype), np.asarray(attention_mask, dtype=self.dtype))
        layers = range(len(self.layers)) if layers is None else layers
        if hidden is None:
            if layers.start != 0:
                raise ShapeError(
                    "encode: give the hidden states that enter layer "
                    f"{layers.start}, or start at layer 0"
                )
            hidden = self.embeddings.apply(tape, ids, np.zeros_like(ids))
        for n in layers:
            hidden = self.layers[n].apply(tape, hidden, mask)
        return hidden

    def pool(self, tape: Tape, hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Mean of the hidden states over the unmasked tokens (sentence-transformers)."""
        mask = np.asarray(attention_mask, dtype=self.dtype)
        return tape.apply(self._pool_op, hidden, mask)

    @property
    def _pool_op(self) -> Any:
        return self.embeddings._op["masked_mean_pool"]

    def record(self, tape: Tape, *inputs: np.ndarray) -> np.ndarray:
        """``(input_ids, attention_mask)`` → the last hidden states, recorded on ``tape``."""
        input_ids, attention_mask = self._inputs(inputs, 2)
        return self.encode(tape, input_ids, _float_mask(attention_mask, self.dtype))

    # -- Hugging Face weights --------------------------------------------------------------

    _PER_HEAD = ("query", "key", "value")

    def load_hf(self, weights: Mapping[str, Any], prefix: str = "") -> None:
        """Load a Hugging Face ``BertModel`` state (``safetensors`` arrays or torch tensors),
        names optionally under ``prefix`` (e.g. ``"bert."``); the pooler (unused by mean
        pooling) and the ``position_ids`` buffer are ignored.  Every name and shape is checked
        before anything is written."""
        ignored = ("pooler.", "embeddings.position_ids")
        state = {
            k[len(prefix) :]: np.asarray(v)
            for k, v in weights.items()
            if k.startswith(prefix) and not k[len(prefix) :].startswith(ignored)
        }
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise StateDictError(
                f"BERT weights do not match the model: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        arrays = {}
        for name, p in params.items():
            value = state[name]
            if value.size != p.data.size:
                raise StateDictError(
                    f"{name}: the weights have shape {value.shape}, the model needs {p.shape}"
                )
            arrays[name] = value.reshape(p.shape).astype(p.data.dtype)
        for name, p in params.items():
            p.data = np.ascontiguousarray(arrays[name])

    def hf_state_dict(self) -> dict[str, np.ndarray]:
        """The parameters in Hugging Face's names and shapes (per-head weights flattened)."""
        out = {}
        for name, p in self.named_parameters():
            data = p.data
            if ".attention.self." in name or name.endswith("attention.output.dense.weight"):
                if name.endswith("attention.output.dense.weight"):
                    data = data.reshape(data.shape[0], -1)
                else:
                    data = data.reshape(-1, *data.shape[2:])
            out[name] = data.copy()
        return out


def _float_mask(attention_mask: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The attention mask as given, if it has the model's dtype: a traced forward must see the
    step's own input (a cast copy would be a constant of the compiled step)."""
    mask = np.asarray(attention_mask)
    if mask.dtype != dtype:
        raise DTypeError(
            f"a recorded BERT forward takes the attention mask in the model's dtype {dtype}, got "
            f"{mask.dtype}: pass attention_mask.astype(np.{dtype})"
        )
    return mask


class SequenceClassifier(Module):
    """Mean-pooled encoder layers ``start:`` then a linear head: ``(x, attention_mask)`` →
    logits ``(B, classes)``.  ``x`` is the token ids when ``start`` is 0, else the hidden
    states entering layer ``start`` (cached outputs of a frozen bottom); ``start`` equal to the
    number of layers trains the head alone on pooled embeddings ``x`` ``(B, N)``."""

    def __init__(self, encoder: BertEncoder, head: Linear, start: int = 0) -> None:
        super().__init__()
        layers = len(encoder.layers)
        if not 0 <= start <= layers:
            raise ShapeError(f"start must be in [0, {layers}], got {start}")
        self.encoder, self.head, self.start = encoder, head, start

    def children(self) -> Iterator[tuple[str, Module]]:
        yield "encoder", self.encoder
        yield "head", self.head

    def record(self, tape: Tape, *inputs: np.ndarray) -> np.ndarray:
        x, attention_mask = self._inputs(inputs, 2)
        layers = len(self.encoder.layers)
        if self.start == layers:
            return self.head.record(tape, x)
        mask = _float_mask(attention_mask, self.encoder.dtype)
        if self.start == 0:
            hidden = self.encoder.encode(tape, x, mask)
        else:
            hidden = self.encoder.encode(
                tape, np.zeros(mask.shape, np.int64), mask, range(self.start, layers), x
            )
        return self.head.record(tape, self.encoder.pool(tape, hidden, mask))
