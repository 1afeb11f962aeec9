"""The symgrad BERT encoder against Hugging Face's ``BertModel`` (a tiny random config here;
the real MiniLM weights in tests/test_sms.py): forward in float64 and float32, and the gradient
of every parameter through the tape of derived VJPs, with padding."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from symgrad.errors import ShapeError  # noqa: E402
from symgrad.nn import BertConfig, BertEncoder, Tape  # noqa: E402
from symgrad.nn.modules import StateDictError  # noqa: E402

TINY = {
    "vocab_size": 40,
    "hidden_size": 12,
    "num_attention_heads": 3,
    "intermediate_size": 20,
    "num_hidden_layers": 2,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
}


def _hf_model(dtype):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        **TINY,
        attn_implementation="eager",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertModel(config, add_pooling_layer=True).to(dtype).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0); make them matter
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch(rng):
    ids = rng.integers(1, TINY["vocab_size"], size=(3, 7))
    mask = np.ones((3, 7), dtype=np.int64)
    mask[1, 4:] = 0  # padded
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _ours(model, dtype):
    encoder = BertEncoder(BertConfig.from_dict(TINY), dtype=dtype)
    encoder.load_hf({k: v.detach().numpy() for k, v in model.state_dict().items()})
    return encoder


def _torch_pooled(model, ids, mask):
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    m = torch.tensor(mask, dtype=out.dtype)[..., None]
    return out, (out * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_forward_equals_hugging_face(dtype, tol):
    rng = np.random.default_rng(0)
    model = _hf_model(torch.float64 if dtype == np.float64 else torch.float32)
    encoder = _ours(model, dtype)
    ids, mask = _batch(rng)
    tape = Tape()
    hidden = encoder.encode(tape, ids, mask)
    pooled = encoder.pool(tape, hidden, mask)
    with torch.no_grad():
        want_hidden, want_pooled = _torch_pooled(model, ids, mask)
    keep = mask.astype(bool)  # padded positions are never read downstream
    want = want_hidden.numpy()
    assert np.max(np.abs(hidden[keep] - want[keep])) <= tol * np.max(np.abs(want))
    assert np.max(np.abs(pooled - want_pooled.numpy())) <= tol * np.max(np.abs(want))


def test_every_parameter_gradient_equals_hugging_face():
    """float64, through embeddings (gathers → scatter-adds), attention, GELU, layer norms."""
    rng = np.random.default_rng(1)
    model = _hf_model(torch.float64)
    encoder = _ours(model, np.float64)
    ids, mask = _batch(rng)
    weight = rng.normal(size=(3, TINY["hidden_size"]))
    tape = Tape()
    pooled = encoder.pool(tape, encoder.encode(tape, ids, mask), mask)
    tape.backward(pooled, weight)  # the gradient of Σ weight·pooled
    _, want_pooled = _torch_pooled(model, ids, mask)
    (want_pooled * torch.tensor(weight)).sum().backward()
    ours = encoder.hf_state_dict()
    grads = {name: p.grad for name, p in encoder.named_parameters()}
    params = [(n, p) for n, p in model.named_parameters() if not n.startswith("pooler.")]
    largest = max(float(p.grad.abs().max()) for _, p in params)
    for name, p in params:
        want = p.grad.numpy()
        got = grads[name].reshape(want.shape)
        assert ours[name].shape == want.shape
        # the key bias's gradient is exactly 0 (softmax ignores a shift): both are rounding
        # noise there, compared at the scale of the other gradients
        scale = max(float(np.max(np.abs(want))), 1e-6 * largest)
        assert np.max(np.abs(got - want)) <= 1e-10 * scale, name


def test_frozen_lower_layers_start_from_cached_hidden_states():
    """Level (b) of fine-tuning: layer 1 alone from layer 0's output = the whole encoder."""
    rng = np.random.default_rng(2)
    model = _hf_model(torch.float64)
    encoder = _ours(model, np.float64)
    ids, mask = _batch(rng)
    whole = encoder.encode(Tape(), ids, mask)
    lower = encoder.encode(Tape(), ids, mask, layers=range(1))
    top = encoder.encode(Tape(), ids, mask, layers=range(1, 2), hidden=lower)
    np.testing.assert_array_equal(top, whole)


def test_weights_that_do_not_fit_are_named():
    model = _hf_model(torch.float64)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    encoder = BertEncoder(BertConfig.from_dict(TINY), dtype=np.float64)
    with pytest.raises(StateDictError, match="missing"):
        encoder.load_hf({k: v for k, v in state.items() if "layer.1." not in k})
    state["embeddings.LayerNorm.weight"] = np.ones(5)
    with pytest.raises(StateDictError, match=r"embeddings.LayerNorm.weight: the weights have"):
        encoder.load_hf(state)


def test_bad_batches_are_rejected():
    encoder = BertEncoder(BertConfig.from_dict(TINY), dtype=np.float64)
    ids = np.ones((2, 3), dtype=np.int64)
    with pytest.raises(ShapeError, match="at least one unmasked token"):
        encoder.encode(Tape(), ids, np.zeros((2, 3)))
    with pytest.raises(ShapeError, match=r"\(batch, length\)"):
        encoder.encode(Tape(), ids, np.ones((2, 4)))
    with pytest.raises(ShapeError, match="longer than the model's 16 positions"):
        encoder.encode(Tape(), np.ones((1, 17), dtype=np.int64), np.ones((1, 17)))
