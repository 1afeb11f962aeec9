"""The step compiler (symgrad.compile): a traced, planned, generated training step equals the
reference paths — the layer-by-layer path and the tape's reverse mode — in float64."""

from __future__ import annotations

import numpy as np
import pytest

from symgrad import nn, optim
from symgrad.compile import UnsupportedStepError, compile_step, trace
from symgrad.nn import Tape


def _mlp(seed: int = 1, dtype=np.float64) -> nn.Sequential:
    r = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Linear(6, 8, dtype=dtype, rng=r),
        nn.Tanh(),
        nn.Linear(8, 8, dtype=dtype, rng=r),
        nn.GELU(),
        nn.Linear(8, 3, dtype=dtype, rng=r),
    )


def _layer_path_step(model, loss, opt, x, y) -> float:
    opt.zero_grad()
    out, ctx = model.forward(x)
    value, grad = loss.value_and_grad(out, y)
    model.backward(ctx, grad, need_input_grad=False)
    opt.step()
    return value


@pytest.mark.parametrize("make_opt", [
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: optim.AdamW(ps, lr=1e-2),
])
def test_compiled_mlp_equals_the_layer_path(make_opt):
    rng = np.random.default_rng(0)
    a, b = _mlp(), _mlp()
    step = compile_step(a, nn.CrossEntropyLoss(), make_opt(a.parameters()))
    opt_b, ce = make_opt(b.parameters()), nn.CrossEntropyLoss()
    for batch in (16, 16, 5, 16, 5):  # two shapes: one compiled function, two bindings
        x, y = rng.normal(size=(batch, 6)), rng.integers(0, 3, batch)
        got = step(x, y)
        want = _layer_path_step(b, ce, opt_b, x, y)
        assert got == pytest.approx(want, rel=1e-12)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        np.testing.assert_allclose(pa.data, pb.data, rtol=1e-12, atol=1e-14)
    assert len(step._bindings) == 2


def test_frozen_bottom_runs_forward_only_and_no_input_gradient():
    a = _mlp()
    a[0].requires_grad_(False)
    step = compile_step(a, nn.MSELoss(), optim.SGD(a.parameters(), lr=0.1))
    rng = np.random.default_rng(1)
    before = a[0].weight.data.copy()
    step(rng.normal(size=(4, 6)), rng.normal(size=(4, 3)))
    np.testing.assert_array_equal(a[0].weight.data, before)
    binding = next(iter(step._bindings.values()))
    assert binding.plan.forward_only == [0, 1]  # the frozen linear layer and its tanh
    # the lowest trained layer's VJP computes no input gradient: no cotangent of the tanh
    assert "g1" not in binding.plan.buffers and "g2" in binding.plan.buffers


def test_graph_of_an_mlp():
    model = _mlp()
    x, y = np.zeros((2, 6)), np.zeros(2, dtype=np.int64)
    graph = trace(lambda t, a, b: nn.CrossEntropyLoss().record(t, model.record(t, a), b), (x, y))
    assert [n.op.name for n in graph.nodes] == [
        "linear", "tanh", "linear", "gelu", "linear", "cross_entropy"
    ]
    assert len(graph.params) == 6 and not graph.consts
    assert graph.nodes[-1].shape == (2,)


def test_a_module_without_record_is_refused():
    class Opaque(nn.Module):
        def forward(self, x):
            return x, None

    model = nn.Sequential(nn.Linear(3, 2, dtype=np.float64), Opaque())
    step = compile_step(model, nn.MSELoss(), optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(UnsupportedStepError, match="Opaque"):
        step(np.zeros((2, 3)), np.zeros((2, 2)))


torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.parametrize("start", [0, 1, 2])
def test_compiled_bert_classifier_equals_the_tape(start):
    """A tiny BERT, every level of fine-tuning (all layers, the top one, the head alone): the
    compiled step and the tape give the same losses and parameters (AdamW, float64)."""
    from test_bert import _batch, _hf_model, _ours

    from symgrad.nn.bert import SequenceClassifier

    hf = _hf_model(torch.float64)
    ids, mask = _batch(np.random.default_rng(0))
    labels = np.array([0, 1, 1])

    def make() -> SequenceClassifier:
        encoder = _ours(hf, np.float64)
        encoder.requires_grad_(False)
        for layer in encoder.layers[start:]:
            layer.requires_grad_(True)
        head = nn.Linear(12, 2, dtype=np.float64, rng=np.random.default_rng(5))
        return SequenceClassifier(encoder, head, start)

    a, b = make(), make()
    x = ids
    if start:
        tape = Tape()
        x = b.encoder.encode(tape, ids, mask, layers=range(start))
        if start == len(b.encoder.layers):
            x = b.encoder.pool(tape, x, mask)
    fmask = mask.astype(np.float64)
    trained_a = [p for p in a.parameters() if p.requires_grad]
    trained_b = [p for p in b.parameters() if p.requires_grad]
    step = compile_step(a, nn.CrossEntropyLoss(), optim.AdamW(trained_a, lr=1e-3))
    opt_b, ce = optim.AdamW(trained_b, lr=1e-3), nn.CrossEntropyLoss()
    for _ in range(3):
        got = step(x, fmask, labels)
        opt_b.zero_grad()
        tape = Tape()
        logits = b.record(tape, x, fmask)
        want, grad = ce.value_and_grad(logits, labels)
        tape.backward(logits, grad)
        opt_b.step()
        assert got == pytest.approx(want, rel=1e-12)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        np.testing.assert_allclose(pa.data, pb.data, rtol=1e-12, atol=1e-14)


def test_an_integer_mask_is_refused_by_the_recorded_forward():
    from test_bert import _batch, _hf_model, _ours

    from symgrad.errors import DTypeError
    from symgrad.nn.bert import SequenceClassifier

    encoder = _ours(_hf_model(torch.float64), np.float64)
    model = SequenceClassifier(encoder, nn.Linear(12, 2, dtype=np.float64))
    ids, mask = _batch(np.random.default_rng(0))
    step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(DTypeError, match="attention mask"):
        step(ids, mask, np.array([0, 1, 1]))
