"""The fused training step equals the layer-by-layer path (float64), and rejects bad input."""

import numpy as np
import pytest

from symgrad import nn, optim
from symgrad.errors import IndexRangeError, ShapeError
from symgrad.runtime.step import UnsupportedStepError, compile_step
from symgrad.tasks.finetune import make_optimizer


def _mlp(bias=True, act=nn.Tanh):
    r = np.random.default_rng(1)
    return nn.Sequential(
        nn.Linear(6, 8, dtype=np.float64, rng=r),
        act(),
        nn.Linear(8, 8, bias=bias, dtype=np.float64, rng=r),
        nn.GELU(),
        nn.Linear(8, 3, dtype=np.float64, rng=r),
    )


def _layer_step(model, loss, opt, x, y):
    body, objective = nn.fuse(model, loss)
    opt.zero_grad()
    out, ctx = body.forward(x)
    value, grad = objective.value_and_grad(out, y)
    body.backward(ctx, grad, need_input_grad=False)
    opt.step()
    return value


@pytest.mark.parametrize(
    "name, bias", [("sgd", True), ("sgd", False), ("adam", True), ("adamw", False)]
)
def test_fused_step_equals_layer_by_layer(name, bias):
    rng = np.random.default_rng(0)
    a, b = _mlp(bias), _mlp(bias)
    opt_a, opt_b = make_optimizer(name, a.parameters()), make_optimizer(name, b.parameters())
    step = compile_step(b, nn.CrossEntropyLoss(), opt_b)
    for size in (10, 10, 10, 7, 10):  # a short last batch reuses the buffers' first rows
        x, y = rng.normal(size=(size, 6)), rng.integers(0, 3, size)
        expected = _layer_step(a, nn.CrossEntropyLoss(), opt_a, x, y)
        assert step(x, y) == pytest.approx(expected, rel=1e-13)
    for k, v in a.state_dict().items():
        np.testing.assert_allclose(b.state_dict()[k], v, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss", [nn.BCELoss, nn.MSELoss, nn.BCEWithLogitsLoss])
def test_fused_step_with_elementwise_losses(loss):
    rng = np.random.default_rng(3)

    def model():
        r = np.random.default_rng(5)
        return nn.Sequential(nn.Linear(6, 4, dtype=np.float64, rng=r), nn.Sigmoid())

    a, b = model(), model()
    opt_a = optim.SGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    opt_b = optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    step = compile_step(b, loss(), opt_b)
    for _ in range(4):
        x = rng.normal(size=(5, 6))
        y = (rng.uniform(size=(5, 4)) > 0.5).astype(np.float64)
        assert step(x, y) == pytest.approx(_layer_step(a, loss(), opt_a, x, y), rel=1e-13)
    for k, v in a.state_dict().items():
        np.testing.assert_allclose(b.state_dict()[k], v, rtol=1e-12, atol=1e-15)


def test_frozen_layers_are_not_updated_by_the_fused_step():
    model = _mlp()
    model[0].requires_grad_(False)
    before = model.state_dict()
    step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    rng = np.random.default_rng(2)
    step(rng.normal(size=(4, 6)), rng.integers(0, 3, 4))
    np.testing.assert_array_equal(model.state_dict()["0.weight"], before["0.weight"])
    assert not np.array_equal(model.state_dict()["4.weight"], before["4.weight"])


def test_fused_step_source_has_no_python_between_layers():
    model = _mlp()
    step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    rng = np.random.default_rng(2)
    step(rng.normal(size=(4, 6)), rng.integers(0, 3, 4))
    source = step._fn.py_func.__code__.co_filename
    with open(source) as handle:
        text = handle.read()
    assert text.count("@njit") == 1 + text.count("def _sg_")  # one step function (+ math helpers)
    assert "lin4_vjp(" in text and "loss_vjp(" in text
    # a linear layer under an activation: the GEMM, then bias and activation in one loop
    assert "mm0_forward(x, W0," in text and "_v0 = h0[r, i] + b0[i]" in text
    assert "lin4_forward(" in text  # the last layer has no activation to join


def test_unsupported_models_and_bad_batches_are_named():
    with pytest.raises(UnsupportedStepError, match="LayerNorm"):
        m = nn.Sequential(nn.Linear(3, 3, dtype=np.float64), nn.LayerNorm(3, dtype=np.float64))
        compile_step(m, nn.MSELoss(), optim.SGD(m.parameters(), lr=0.1))
    model = _mlp()
    step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(Exception, match=r"\(batch, 6\)"):
        step(np.zeros((2, 5)), np.zeros(2, dtype=int))
    with pytest.raises(Exception, match="labels must lie"):
        step(np.zeros((2, 6)), np.array([0, 9]))


def _mlp32():
    r = np.random.default_rng(1)
    return nn.Sequential(
        nn.Linear(6, 16, rng=r), nn.Tanh(), nn.Linear(16, 16, rng=r), nn.Tanh(),
        nn.Linear(16, 3, rng=r),
    )


def test_float32_step_uses_float32_math_and_stays_close_to_the_layer_path():
    rng = np.random.default_rng(4)
    a, b = _mlp32(), _mlp32()
    opt_a, opt_b = optim.SGD(a.parameters(), lr=0.1), optim.SGD(b.parameters(), lr=0.1)
    step = compile_step(b, nn.CrossEntropyLoss(), opt_b)
    for _ in range(5):
        x = rng.normal(size=(12, 6)).astype(np.float32) * 3
        y = rng.integers(0, 3, 12)
        expected = _layer_step(a, nn.CrossEntropyLoss(), opt_a, x, y)
        assert step(x, y) == pytest.approx(expected, rel=1e-5)
    for k, v in a.state_dict().items():
        assert b.state_dict()[k].dtype == np.float32
        np.testing.assert_allclose(b.state_dict()[k], v, rtol=1e-4, atol=1e-6)
    with open(step._fn.py_func.__code__.co_filename) as handle:
        text = handle.read()
    assert "_sg_tanh_f32(" in text and "_sg_tanh(" not in text


def test_backward_stops_at_the_lowest_trained_layer():
    """Frozen bottom layers run forward only: no VJP below the lowest trainable layer and no
    input gradient there; the trained layers end up as on the layer path."""
    rng = np.random.default_rng(5)
    a, b = _mlp(), _mlp()
    for model in (a, b):
        model[0].requires_grad_(False)
    opt_a = optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    opt_b = optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.1)
    step = compile_step(b, nn.CrossEntropyLoss(), opt_b)
    for _ in range(3):
        x, y = rng.normal(size=(9, 6)), rng.integers(0, 3, 9)
        assert step(x, y) == pytest.approx(_layer_step(a, nn.CrossEntropyLoss(), opt_a, x, y))
    for k, v in a.state_dict().items():
        np.testing.assert_allclose(b.state_dict()[k], v, rtol=1e-12, atol=1e-15)
    with open(step._fn.py_func.__code__.co_filename) as handle:
        text = handle.read()
    assert "lin0_vjp" not in text and "lin2_vjp(" in text
    # the lowest trained layer's VJP computes no input gradient: 3 gradients → 2 here
    assert "lin2_vjp(h1, W2, b2, h1.shape[0], W2.shape[0], h1.shape[1], g2, gW2, gb2)" in text


def test_a_bad_label_is_reported_and_nothing_is_updated():
    model = _mlp()
    step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    before = model.state_dict()
    with pytest.raises(IndexRangeError, match=r"label -1 at row 2"):
        step(np.zeros((3, 6)), np.array([0, 1, -1]))
    for k, v in before.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)
    with pytest.raises(ShapeError, match="integer labels"):
        step(np.zeros((3, 6)), np.array([0.0, 1.0, 2.0]))
    small = nn.Sequential(nn.Linear(6, 2, dtype=np.float64), nn.Sigmoid())
    sig = compile_step(small, nn.BCELoss(), optim.SGD(small.parameters(), lr=0.1))
    with pytest.raises(ShapeError, match=r"targets of shape \(3, 2\)"):
        sig(np.zeros((3, 6)), np.zeros((3, 3)))


_WARM_SCRIPT = """
import sys, json
import numpy as np
from symgrad import nn, optim
from symgrad.runtime.step import compile_step
rng = np.random.default_rng(0)
model = nn.Sequential(nn.Linear(5, 8, rng=rng), nn.Tanh(), nn.Linear(8, 3, rng=rng))
opt = optim.SGD(model.parameters(), lr=float(sys.argv[1]), momentum=0.9)
step = compile_step(model, nn.CrossEntropyLoss(), opt)
x = rng.normal(size=(6, 5)).astype(np.float32)
y = rng.integers(0, 3, 6)
losses = [step(x, y) for _ in range(3)]
print(json.dumps({"losses": losses, "sympy": "sympy" in sys.modules,
                  "weight": model.state_dict()["2.weight"].tolist()}))
"""


def _run_fresh(cache, lr):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, SYMGRAD_CACHE_DIR=str(cache))
    done = subprocess.run(
        [sys.executable, "-c", _WARM_SCRIPT, str(lr)],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_warm_start_loads_the_step_without_sympy(tmp_path):
    """A fresh process finds the step through its manifest, imports no SymPy, and computes
    exactly what the cold process computed; another learning rate is the same step (it is an
    argument), computing another run."""
    cold = _run_fresh(tmp_path, 0.1)
    assert cold["sympy"]  # derived and emitted
    warm = _run_fresh(tmp_path, 0.1)
    assert not warm["sympy"]
    assert warm["losses"] == cold["losses"] and warm["weight"] == cold["weight"]
    other = _run_fresh(tmp_path, 0.2)
    assert not other["sympy"] and other["losses"][1:] != cold["losses"][1:]
    (manifest,) = tmp_path.glob("fused_step_manifest_*.json")
    manifest.write_text("{not json")  # a torn manifest: back to the cold path, rewritten
    again = _run_fresh(tmp_path, 0.1)
    assert again["sympy"] and again["losses"] == cold["losses"]
    manifest.write_text(manifest.read_text().replace('"step"', '"stop"'))
    assert _run_fresh(tmp_path, 0.2)["losses"] == other["losses"]
    assert not _run_fresh(tmp_path, 0.1)["sympy"]


def test_freezing_a_layer_after_a_step_takes_effect():
    model = _mlp()
    step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(4, 6)), rng.integers(0, 3, 4)
    step(x, y)
    model[0].requires_grad_(False)
    frozen = model.state_dict()["0.weight"]
    step(x, y)
    np.testing.assert_array_equal(model.state_dict()["0.weight"], frozen)
