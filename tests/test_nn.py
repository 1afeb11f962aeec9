"""Networks: whole-network gradients, fusion, optimizers, state dicts — against torch in float64."""

import numpy as np
import pytest
import sympy as sp
import torch
from scipy.special import expit

import symgrad as sg
from symgrad import nn, optim
from symgrad import torch as sgt
from symgrad.errors import ShapeError, SymgradError

torch.set_default_dtype(torch.float64)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _grads_vs_torch(model, loss, x, y):
    twin = sgt.to_torch(model)
    out, ctx = model.forward(x)
    value, grad = loss.value_and_grad(out, y)
    model.zero_grad()
    model.backward(ctx, grad, need_input_grad=False)
    ty = torch.from_numpy(y)
    tvalue = sgt.twin_loss(loss)(twin(torch.from_numpy(x)), ty)
    tvalue.backward()
    assert abs(value - tvalue.item()) <= 1e-12 * abs(tvalue.item())
    for (name, p), (_, tp) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert _rel(p.grad, tp.grad.numpy()) < 1e-10, name


@pytest.mark.parametrize(
    "layers, loss, target",
    [
        (
            lambda r: [
                nn.Linear(6, 8, dtype=np.float64, rng=r),
                nn.Tanh(),
                nn.Linear(8, 4, dtype=np.float64, rng=r),
            ],
            nn.CrossEntropyLoss,
            "labels",
        ),
        (
            lambda r: [
                nn.Linear(6, 8, dtype=np.float64, rng=r),
                nn.ReLU(),
                nn.LayerNorm(8, dtype=np.float64),
                nn.Linear(8, 4, dtype=np.float64, rng=r),
            ],
            nn.MSELoss,
            "values",
        ),
        (
            lambda r: [
                nn.Linear(6, 5, dtype=np.float64, rng=r),
                nn.GELU(),
                nn.Linear(5, 3, dtype=np.float64, rng=r),
            ],
            nn.BCEWithLogitsLoss,
            "binary",
        ),
        (
            lambda r: [
                nn.Linear(6, 5, dtype=np.float64, rng=r),
                nn.SiLU(),
                nn.Linear(5, 3, dtype=np.float64, rng=r),
                nn.Sigmoid(),
            ],
            nn.BCELoss,
            "binary",
        ),
        (
            lambda r: [
                nn.Linear(6, 5, dtype=np.float64, rng=r),
                nn.Softplus(),
                nn.Linear(5, 5, dtype=np.float64, rng=r),
                nn.ELU(),
                nn.Linear(5, 4, bias=False, dtype=np.float64, rng=r),
            ],
            nn.CrossEntropyLoss,
            "labels",
        ),
    ],
)
def test_network_gradients_match_torch(layers, loss, target):
    rng = np.random.default_rng(0)
    model = nn.Sequential(*layers(rng))
    x = rng.normal(size=(7, 6))
    width = model[-2].out_features if isinstance(model[-1], nn.Sigmoid) else model[-1].out_features
    y = {
        "labels": rng.integers(0, width, 7),
        "values": rng.normal(size=(7, width)),
        "binary": rng.integers(0, 2, (7, width)).astype(np.float64),
    }[target]
    _grads_vs_torch(model, loss(), x, y)


def test_sigmoid_then_bce_is_fused_to_p_minus_y():
    rng = np.random.default_rng(1)
    model = nn.Sequential(nn.Linear(3, 1, dtype=np.float64, rng=rng), nn.Sigmoid())
    body, fused = nn.fuse(model, nn.BCELoss())
    assert len(body) == 1
    z = np.linspace(-30, 30, 61)[:, None]
    y = (rng.uniform(size=z.shape) > 0.5).astype(np.float64)
    _, grad = fused.value_and_grad(z, y)
    # the closed form p − y (mean reduction), written without cancellation: for y = 1 it is
    # σ(z) − 1 = −σ(−z)
    expected = np.where(y == 1, -expit(-z), expit(z)) / z.size
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-300)
    # far out the unfused form overflows/saturates; the fused kernel stays finite
    value, grad = fused.value_and_grad(np.array([[-1e3], [1e3]]), np.array([[1.0], [0.0]]))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_bce_with_logits_formula_derives_sigmoid_minus_target_exactly():
    z, y = sp.symbols("z y", real=True)
    op = sg.builtin("bce_with_logits")
    partial = op.derivation().partials[0].final
    zx = op.spec.inputs[0]
    yy = op.spec.inputs[1]
    assert (
        sp.simplify(partial.subs({zx: z, yy: y}).rewrite(sp.exp) - (1 / (1 + sp.exp(-z)) - y)) == 0
    )


@pytest.mark.parametrize(
    "make, make_twin",
    [
        (lambda ps: optim.SGD(ps, lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
        (
            lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
        ),
        (
            lambda ps: optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02),
        ),
        (
            lambda ps: optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
            lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        ),
        (lambda ps: optim.AdamW(ps, lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01)),
    ],
)
def test_optimizer_steps_match_torch(make, make_twin):
    rng = np.random.default_rng(2)
    p = nn.Parameter(rng.normal(size=(4, 3)))
    tp = torch.tensor(p.data.copy(), requires_grad=True)
    opt, topt = make([p]), make_twin([tp])
    for _ in range(6):
        g = rng.normal(size=(4, 3))
        p.grad = g.copy()
        tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
    assert _rel(p.data, tp.detach().numpy()) < 1e-13


def test_optimizer_rejects_bad_hyperparameters():
    p = nn.Parameter(np.zeros(3))
    with pytest.raises(SymgradError, match="learning rate"):
        optim.SGD([p], lr=-0.1)
    with pytest.raises(SymgradError, match="Nesterov"):
        optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(SymgradError, match="empty parameter list"):
        optim.Adam([], lr=0.1)


def test_state_dict_round_trip_with_torch_sequential():
    rng = np.random.default_rng(3)
    model = nn.Sequential(
        nn.Linear(4, 5, dtype=np.float64, rng=rng),
        nn.Tanh(),
        nn.LayerNorm(5, dtype=np.float64),
        nn.Linear(5, 2, dtype=np.float64, rng=rng),
    )
    twin = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2)
    )
    assert list(model.state_dict()) == list(twin.state_dict())
    model.load_state_dict(twin.state_dict())  # torch → symgrad
    x = rng.normal(size=(3, 4))
    np.testing.assert_allclose(
        model(x), twin(torch.from_numpy(x)).detach().numpy(), rtol=1e-12, atol=1e-13
    )
    model[0].weight.data += 1.0
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})  # back
    np.testing.assert_allclose(
        model(x), twin(torch.from_numpy(x)).detach().numpy(), rtol=1e-12, atol=1e-13
    )


def test_load_state_dict_checks_names_and_shapes_before_writing():
    model = nn.Sequential(nn.Linear(2, 3, dtype=np.float64))
    before = model.state_dict()
    with pytest.raises(nn.StateDictError, match="missing"):
        model.load_state_dict({"0.weight": np.zeros((3, 2))})
    with pytest.raises(nn.StateDictError, match="shape"):
        model.load_state_dict({"0.weight": np.zeros((3, 2)), "0.bias": np.zeros(4)})
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_linear_init_matches_torch_distribution():
    from scipy import stats

    layer = nn.Linear(400, 300, dtype=np.float64, rng=np.random.default_rng(4))
    bound = 1 / np.sqrt(400)
    w = layer.weight.data.ravel()
    assert np.all(np.abs(w) <= bound)
    assert stats.kstest(w, stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3
    torch_w = torch.nn.Linear(400, 300).weight.detach().numpy().ravel()
    assert stats.ks_2samp(w, torch_w).pvalue > 1e-3


def test_module_repr_and_parameter_count():
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    assert model.num_parameters() == 64 * 128 + 128 + 128 * 10 + 10
    model[0].requires_grad_(False)
    assert model.num_parameters(trainable_only=True) == 128 * 10 + 10
    text = repr(model)
    assert "(0): Linear(in_features=64, out_features=128, bias=True)" in text
    assert "(1): Tanh()" in text


def test_bad_inputs_are_named_errors():
    layer = nn.Linear(3, 2, dtype=np.float64)
    with pytest.raises(ShapeError, match=r"\(batch, 3\)"):
        layer(np.zeros((4, 5)))
    with pytest.raises(SymgradError, match="float64 weights"):
        layer(np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(SymgradError, match=r"labels must lie in \[0, 2\)"):
        nn.CrossEntropyLoss().value_and_grad(np.zeros((2, 2)), np.array([0, 5]))
    with pytest.raises(SymgradError, match="probability"):
        nn.BCELoss().value_and_grad(np.array([1.5]), np.array([1.0]))
    with pytest.raises(SymgradError, match="one-input elementwise"):
        nn.Elementwise(sg.builtin("mse"))


def test_a_model_that_ran_is_copied_and_pickled_with_its_ops(tmp_path):
    """A model whose ops were built (built-ins and a user op) deep-copies — the copy shares
    the ops, owns its parameters — and pickles: a fresh process rebuilds the ops from their
    specs and computes the same outputs."""
    import copy
    import pickle
    import subprocess
    import sys

    x_sym = sp.Symbol("x", real=True)
    scaled = sg.elementwise(x_sym * sp.tanh(x_sym), inputs=[x_sym], name="x_tanh_x")
    rng = np.random.default_rng(3)
    model = nn.Sequential(
        nn.Linear(4, 6, dtype=np.float64, rng=rng), nn.GELU(), nn.Elementwise(scaled),
        nn.LayerNorm(6, dtype=np.float64), nn.Linear(6, 2, dtype=np.float64, rng=rng),
    )  # fmt: skip
    x = rng.normal(size=(5, 4))
    want = model(x)
    clone = copy.deepcopy(model)
    assert clone[2].op is model[2].op and clone[0].weight is not model[0].weight
    clone[0].weight.data[:] = 0
    np.testing.assert_array_equal(model(x), want)
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps((model, x)))
    script = (
        "import pickle, sys, numpy as np\n"
        "model, x = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "np.save(sys.argv[2], model(x))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "out.npy")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)


def test_an_op_made_without_a_recipe_is_refused_by_pickle(monkeypatch):
    import pickle

    op = sg.builtin("tanh")
    monkeypatch.setattr(op, "recipe", None)
    with pytest.raises(SymgradError, match="'tanh' cannot be pickled"):
        pickle.dumps(op)
