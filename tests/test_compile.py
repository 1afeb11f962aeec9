"""The step compiler (symgrad.compile): a traced, planned, generated training step equals the
reference paths — the layer-by-layer path and the tape's reverse mode — in float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from symgrad import nn, optim
from symgrad.codegen.jit import njit
from symgrad.compile import UnsupportedStepError, compile_step, trace
from symgrad.errors import DTypeError, ShapeError, SymgradError
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
    """One step on the layer-by-layer path (a trailing activation fused into the loss, as the
    compiled step does)."""
    body, objective = nn.fuse(model, loss)
    opt.zero_grad()
    out, ctx = body.forward(x)
    value, grad = objective.value_and_grad(out, y)
    body.backward(ctx, grad, need_input_grad=False)
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


@pytest.mark.parametrize(
    "name, bias", [("sgd", True), ("sgd", False), ("adam", True), ("adamw", False)]
)
def test_compiled_step_equals_the_layer_path_with_and_without_bias(name, bias):
    from symgrad.tasks.finetune import make_optimizer

    def model():
        r = np.random.default_rng(1)
        return nn.Sequential(
            nn.Linear(6, 8, dtype=np.float64, rng=r), nn.Tanh(),
            nn.Linear(8, 8, bias=bias, dtype=np.float64, rng=r), nn.GELU(),
            nn.Linear(8, 3, dtype=np.float64, rng=r),
        )

    rng = np.random.default_rng(0)
    a, b = model(), model()
    opt_a, opt_b = make_optimizer(name, a.parameters()), make_optimizer(name, b.parameters())
    step = compile_step(b, nn.CrossEntropyLoss(), opt_b)
    for size in (10, 10, 10, 7, 10):  # a short last batch: a second binding
        x, y = rng.normal(size=(size, 6)), rng.integers(0, 3, size)
        expected = _layer_path_step(a, nn.CrossEntropyLoss(), opt_a, x, y)
        assert step(x, y) == pytest.approx(expected, rel=1e-13)
    for k, v in a.state_dict().items():
        np.testing.assert_allclose(b.state_dict()[k], v, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss", [nn.BCELoss, nn.MSELoss, nn.BCEWithLogitsLoss])
def test_a_trailing_activation_is_fused_into_an_elementwise_loss(loss):
    """Sigmoid + BCELoss is one formula (BCE on the logits, finite at any logit), as on the
    layer path; the steps agree with it, Nesterov momentum included."""
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
        assert step(x, y) == pytest.approx(_layer_path_step(a, loss(), opt_a, x, y), rel=1e-13)
    for k, v in a.state_dict().items():
        np.testing.assert_allclose(b.state_dict()[k], v, rtol=1e-12, atol=1e-15)
    graph = next(iter(step._bindings.values())).graph
    assert len(graph.nodes) == 2  # the linear layer and the loss (with the sigmoid in it)
    if loss is nn.BCELoss:  # far beyond float64's sigmoid: the loss stays finite
        big = np.full((2, 6), 1e3)
        assert np.isfinite(step(big, np.zeros((2, 4))))


def test_a_float32_step_uses_float32_kernels_and_stays_close_to_the_layer_path():
    def model():
        r = np.random.default_rng(1)
        return nn.Sequential(
            nn.Linear(6, 16, rng=r), nn.Tanh(), nn.Linear(16, 16, rng=r), nn.Tanh(),
            nn.Linear(16, 3, rng=r),
        )

    rng = np.random.default_rng(4)
    a, b = model(), model()
    opt_a, opt_b = optim.SGD(a.parameters(), lr=0.1), optim.SGD(b.parameters(), lr=0.1)
    step = compile_step(b, nn.CrossEntropyLoss(), opt_b)
    for _ in range(5):
        x = rng.normal(size=(12, 6)).astype(np.float32) * 3
        y = rng.integers(0, 3, 12)
        expected = _layer_path_step(a, nn.CrossEntropyLoss(), opt_a, x, y)
        assert step(x, y) == pytest.approx(expected, rel=1e-5)
    for k, v in a.state_dict().items():
        assert b.state_dict()[k].dtype == np.float32
        np.testing.assert_allclose(b.state_dict()[k], v, rtol=1e-4, atol=1e-6)
    binding = next(iter(step._bindings.values()))
    assert all(buf.dtype == np.float32 for buf in binding.plan.buffers.values()
               if buf.dtype.kind == "f")
    text = Path(step._module.__file__).read_text()
    assert "_f32" in text and "import forward_saved_f64" not in text


def test_bad_batches_are_named_and_change_nothing():
    model = _mlp()
    step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    before = model.state_dict()
    bad = [
        ((np.zeros((2, 5)), np.zeros(2, dtype=int)), ShapeError, r"\(batch, 6\), got \(2, 5\)"),
        ((np.zeros((2, 6)), np.array([0, 9])), SymgradError, r"labels must lie in \[0, 3\)"),
        ((np.zeros((3, 6)), np.array([0, 1, -1])), SymgradError, r"found \[-1\]"),
        ((np.zeros((3, 6)), np.array([0.0, 1.0, 2.0])), DTypeError, "integer class labels"),
        ((np.zeros((3, 6)),), UnsupportedStepError, "inputs and then the target"),
        ((np.zeros((3, 6)), np.zeros(3), np.zeros(3, dtype=int)), ShapeError,
         r"Sequential takes 1 input array\(s\), got 2"),
        ((np.zeros((0, 6)), np.zeros(0, dtype=int)), ShapeError, "at least one example"),
        ((np.zeros((2, 6), np.float32), np.zeros(2, dtype=int)), DTypeError, "float64 weights"),
    ]
    for args, error, match in bad:
        with pytest.raises(error, match=match):
            step(*args)
    for k, v in before.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)
    small = nn.Sequential(nn.Linear(6, 2, dtype=np.float64), nn.Sigmoid())
    sig = compile_step(small, nn.BCELoss(), optim.SGD(small.parameters(), lr=0.1))
    with pytest.raises(ShapeError, match=r"BCELoss \(after Sigmoid\).*target has shape \(3, 3\)"):
        sig(np.zeros((3, 6)), np.zeros((3, 3)))


@pytest.mark.parametrize("clip", [{}, {"clip_grad_norm": 0.3}, {"clip_grad_value": 0.02}])
def test_a_driver_step_equals_one_compiled_function_bit_for_bit(clip, monkeypatch):
    """A large graph's step is a Python driver calling the compiled kernels (its compile time
    grows linearly); it computes exactly what the one compiled function computes."""
    import symgrad.compile.plan as plan_module

    rng = np.random.default_rng(9)
    batches = [(rng.normal(size=(8, 6)), rng.integers(0, 3, 8)) for _ in range(3)]
    results = []
    for limit in (plan_module.WHOLE_STEP_OPS, 0):
        monkeypatch.setattr(plan_module, "WHOLE_STEP_OPS", limit)
        model = _mlp()
        step = compile_step(model, nn.CrossEntropyLoss(),
                            optim.AdamW(model.parameters(), lr=1e-2), **clip)  # fmt: skip
        losses = [step(x, y) for x, y in batches]
        binding = next(iter(step._bindings.values()))
        assert binding.plan.whole == (limit > 0)
        text = Path(step._module.__file__).read_text()
        assert ("\ndef forward_backward(" in text) and (
            (f"{njit()}\ndef forward_backward(" in text) == (limit > 0)
        )
        results.append((losses, model.state_dict(), step.grad_norm))
    (l1, p1, n1), (l2, p2, n2) = results
    assert l1 == l2
    for k, v in p1.items():
        np.testing.assert_array_equal(p2[k], v)
    assert n1 == n2 or (np.isnan(n1) and np.isnan(n2))


def test_the_step_keeps_the_models_output():
    """``step.output``: the logits the step's forward computed (before its update), for a
    training accuracy without a second forward."""
    model = _mlp()
    step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.5))
    assert step.output is None
    rng = np.random.default_rng(8)
    for batch in (7, 3):
        x, y = rng.normal(size=(batch, 6)), rng.integers(0, 3, batch)
        expected = model(x)
        step(x, y)
        np.testing.assert_allclose(step.output, expected, rtol=1e-12, atol=1e-15)
        assert not np.allclose(model(x), expected)  # the parameters moved after it


def _pool_bases(step) -> dict[int, np.ndarray]:
    """The distinct arrays that the buffers of every shape a step keeps are views of."""
    bases = {}
    for binding in step._bindings.values():
        for a in [*binding.args, *binding.flats, *(g for _, g in binding.grads)]:
            if isinstance(a, np.ndarray) and a.base is not None:
                while a.base is not None:
                    a = a.base
                bases[id(a)] = a
    return bases


@pytest.mark.parametrize("kept", [64, 2])
def test_a_step_over_many_shapes_holds_one_set_of_buffers(kept, monkeypatch):
    """Batches of many sizes (padded sequences of many lengths): the step's buffers are views
    of one pool no larger than the largest shape's buffers — not a set per shape — and every
    loss, gradient and parameter equals, bit for bit, what a fresh step (buffers of its own,
    zeros) computes from the same state; with few shapes kept, a shape dropped and traced
    again computes the same too."""
    import symgrad.compile.step as step_module

    monkeypatch.setattr(step_module, "SHAPES_KEPT", kept)
    a, b = _mlp(), _mlp()
    step = compile_step(a, nn.CrossEntropyLoss(), optim.AdamW(a.parameters(), lr=1e-2))
    opt_b = optim.AdamW(b.parameters(), lr=1e-2)  # its state carries across the fresh steps
    rng = np.random.default_rng(3)
    sizes = [7, 16, 3, 30, 16, 1, 24, 7, 30, 11, 2, 19, 3, 24]
    largest = 0
    for batch in sizes:
        x, y = rng.normal(size=(batch, 6)), rng.integers(0, 3, batch)
        fresh = compile_step(b, nn.CrossEntropyLoss(), opt_b)
        want = fresh(x, y)
        assert step(x, y) == want
        np.testing.assert_array_equal(step.output, fresh.output)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            np.testing.assert_array_equal(pa.grad, pb.grad)
            np.testing.assert_array_equal(pa.data, pb.data)
        largest = max(largest, fresh.memory()["held"])
        assert step.memory()["held"] == fresh.memory()["held"]
        # what every kept shape's buffers view: the pool, at most the largest shape's bytes
        held = sum(base.nbytes for base in _pool_bases(step).values())
        assert held <= step.memory()["pool"] <= largest
    assert len(step._bindings) == min(kept, len(set(sizes)))


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
    assert not np.array_equal(model.state_dict()["2.weight"], frozen)


def test_an_edited_model_is_traced_again():
    """A layer replaced, parameters given arrays of other shapes, the optimizer given more
    parameters: the step notices each before its next call, as the layer path would."""
    a, b = _mlp(), _mlp()
    step = compile_step(a, nn.CrossEntropyLoss(), optim.SGD(a[2:].parameters(), lr=0.1))
    opt_b, ce = optim.SGD(b[2:].parameters(), lr=0.1), nn.CrossEntropyLoss()
    rng = np.random.default_rng(11)

    def steps() -> None:
        for _ in range(2):
            x, y = rng.normal(size=(6, 6)), rng.integers(0, 3, 6)
            assert step(x, y) == pytest.approx(_layer_path_step(b, ce, opt_b, x, y), rel=1e-12)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            np.testing.assert_allclose(pa.data, pb.data, rtol=1e-12, atol=1e-14)

    steps()
    # the bottom layer joins the optimizer: trained from now on
    first = a[0].weight.data.copy()
    step.optimizer.add_param_group({"params": a[0].parameters()})
    opt_b.add_param_group({"params": b[0].parameters()})
    steps()
    assert not np.array_equal(a[0].weight.data, first)
    # a hidden layer of 10, not 8: new layers, the optimizer given their parameters
    for model, opt in ((a, step.optimizer), (b, opt_b)):
        r = np.random.default_rng(5)
        model[0] = nn.Linear(6, 10, dtype=np.float64, rng=r)
        model[2] = nn.Linear(10, 8, dtype=np.float64, rng=r)
        opt.add_param_group({"params": model[0].parameters() + model[2].parameters()})
    steps()
    assert a[0].weight.grad.shape == (10, 6)
    # an activation replaced
    a[1], b[1] = nn.ReLU(), nn.ReLU()
    steps()
    assert [n.op.name for n in next(reversed(step._bindings.values())).graph.nodes][:2] == [
        "linear", "relu"
    ]


def test_freezing_the_top_layer_keeps_its_last_gradient():
    """The gradients are views of the step's pool; a layer frozen after a step keeps the
    gradient it had (as torch keeps ``.grad``), not the memory's next tenant."""
    model = _mlp()
    step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(4, 6)), rng.integers(0, 3, 4)
    step(x, y)
    top = model[4].weight
    kept = top.grad.copy()
    model[4].requires_grad_(False)
    for _ in range(2):
        step(rng.normal(size=(5, 6)), rng.integers(0, 3, 5))
    np.testing.assert_array_equal(top.grad, kept)


def test_a_failed_step_leaves_the_last_output():
    """A step that raises (a label out of range) reports nothing of its shape: ``output`` is
    still the last step's (its buffer shares the pool with the failed shape's)."""
    model = _mlp()
    step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
    step(b, rng.integers(0, 3, 3))
    step(a, rng.integers(0, 3, 4))
    before = step.output.copy()
    with pytest.raises(SymgradError):
        step(b, np.array([0, 1, 7]))  # label 7 of 3 classes
    assert step.output.shape == before.shape
    np.testing.assert_array_equal(step.output, before)


_WARM_SCRIPT = """
import sys, json
from pathlib import Path

import numpy as np
from symgrad import nn, optim
from symgrad.compile import compile_step
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


def _run_fresh(cache, script, *argv):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, SYMGRAD_CACHE_DIR=str(cache))
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, argv)],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _seeded(cache):
    """A cache directory holding the suite's shared cache's op kernels and records, but no
    step module: a cold process generates its step (and imports SymPy for it) without
    compiling every op's kernels again (links; a writer replaces files, never edits them)."""
    import contextlib
    import os
    import shutil

    from symgrad.runtime.cache import cache_dir

    shared = cache_dir()
    for source in shared.rglob("*"):
        if source.is_dir() or source.name.startswith((".", "training_step_")):
            continue
        target = cache / source.relative_to(shared)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            # a file removed meanwhile by another worker is compiled again if needed
            with contextlib.suppress(OSError):
                shutil.copy2(source, target)
    return cache


def test_a_warm_start_loads_the_step_without_sympy(tmp_path):
    """A fresh process finds the step's module (and its ops) in the cache, imports no SymPy,
    and computes exactly what the cold process computed; another learning rate is the same
    module (an argument); a damaged module is generated again."""
    _seeded(tmp_path)
    cold = _run_fresh(tmp_path, _WARM_SCRIPT, 0.1)
    assert cold["sympy"]  # derived and emitted
    warm = _run_fresh(tmp_path, _WARM_SCRIPT, 0.1)
    assert not warm["sympy"]
    assert warm["losses"] == cold["losses"] and warm["weight"] == cold["weight"]
    other = _run_fresh(tmp_path, _WARM_SCRIPT, 0.2)
    assert not other["sympy"] and other["losses"][1:] != cold["losses"][1:]
    (module,) = tmp_path.glob("training_step_*.py")
    module.write_text(module.read_text().replace("return loss", "return -loss"))
    again = _run_fresh(tmp_path, _WARM_SCRIPT, 0.1)
    assert again["sympy"] and again["losses"] == cold["losses"]


def test_a_step_module_of_another_structure_is_not_trusted(tmp_path, monkeypatch):
    """The module's file name holds a digest of the structure key; the whole key is in its
    header and compared.  A ReLU model's step put under a tanh model's name is replaced: the
    tanh step equals the layer path."""
    monkeypatch.setenv("SYMGRAD_CACHE_DIR", str(tmp_path))

    def model(act):
        r = np.random.default_rng(2)
        return nn.Sequential(nn.Linear(3, 4, dtype=np.float64, rng=r), act(),
                             nn.Linear(4, 2, dtype=np.float64, rng=r))

    xs, ys = np.random.default_rng(3).normal(size=(5, 3)), np.array([0, 1, 1, 0, 1])
    relu = model(nn.ReLU)
    compile_step(relu, nn.CrossEntropyLoss(), optim.SGD(relu.parameters(), lr=0.1))(xs, ys)
    (relu_step,) = tmp_path.glob("training_step_*.py")
    tanh = model(nn.Tanh)
    step = compile_step(tanh, nn.CrossEntropyLoss(), optim.SGD(tanh.parameters(), lr=0.1))
    key = step._bind((xs, ys), step._owners()) and step._key
    tanh_step = next(p for p in tmp_path.glob("training_step_*.py") if p != relu_step)
    tanh_step.write_text(relu_step.read_text())
    import sys

    sys.modules.pop(f"_symgrad_kernels_{tanh_step.stem}", None)  # as in a fresh process
    fresh = model(nn.Tanh)
    fresh_step = compile_step(fresh, nn.CrossEntropyLoss(), optim.SGD(fresh.parameters(), lr=0.1))
    loss = fresh_step(xs, ys)
    reference = model(nn.Tanh)
    out, _ = reference.forward(xs)
    expected, _ = nn.CrossEntropyLoss().value_and_grad(out, ys)
    assert loss == pytest.approx(expected, rel=1e-13)
    assert f"; spec {key}\n" in tanh_step.read_text()


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


_WARM_BERT = """
import sys, json
import numpy as np
from symgrad import nn, optim
from symgrad.compile import compile_step
from symgrad.nn.bert import BertConfig, BertEncoder, SequenceClassifier
rng = np.random.default_rng(0)
config = BertConfig(vocab_size=40, hidden_size=8, num_attention_heads=2, intermediate_size=16,
                    num_hidden_layers=2, max_position_embeddings=12)
encoder = BertEncoder(config, np.float32)
for p in encoder.parameters():
    p.data[...] = rng.normal(size=p.data.shape) * 0.2
model = SequenceClassifier(encoder, nn.Linear(8, 2, rng=rng))
step = compile_step(model, nn.CrossEntropyLoss(), optim.AdamW(model.parameters(), lr=1e-3))
ids = rng.integers(0, 40, (3, 6))
mask = np.ones((3, 6), np.float32)
mask[1, 4:] = 0
labels = np.array([0, 1, 1])
losses = [step(ids, mask, labels) for _ in range(3)]
print(json.dumps({"losses": losses, "sympy": "sympy" in sys.modules}))
"""


def test_a_warm_start_loads_a_bert_step_without_sympy(tmp_path):
    """The transformer's compiled step, found again by a fresh process: its ops through their
    op records, the step's module by its structure key; no SymPy, the same losses."""
    _seeded(tmp_path)
    cold = _run_fresh(tmp_path, _WARM_BERT)
    warm = _run_fresh(tmp_path, _WARM_BERT)
    assert cold["sympy"] and not warm["sympy"]
    assert warm["losses"] == cold["losses"] and warm["losses"][2] < warm["losses"][0]
