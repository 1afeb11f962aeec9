"""Training loop: twin runs against torch, freezing, checkpoints and resume, bad data."""

import json
import warnings

import numpy as np
import pytest

from symgrad import nn, optim
from symgrad import torch as sgt
from symgrad.cli import main
from symgrad.errors import StepFallbackWarning, SymgradError, UnsupportedStepError
from symgrad.tasks import finetune
from symgrad.tasks.digits import few_shot_split, load_mnist_8x8, to_sklearn_8x8
from symgrad.train import DataError, batch_order, check_fit_options, fit


def _model(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Linear(5, 7, dtype=dtype, rng=rng), nn.Tanh(), nn.Linear(7, 3, dtype=dtype, rng=rng)
    )


def _data(n=40):
    rng = np.random.default_rng(9)
    return rng.normal(size=(n, 5)), rng.integers(0, 3, n)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fit_matches_torch_twin_step_by_step(name):
    x, y = _data()
    model = _model(0)
    twin = sgt.to_torch(model)
    opt = finetune.make_optimizer(name, model.parameters())
    history = fit(model, nn.CrossEntropyLoss(), opt, x, y, epochs=3, batch_size=16, seed=5)
    losses, _ = sgt.run_twin(
        twin,
        sgt.twin_loss(nn.CrossEntropyLoss()),
        sgt.twin_optimizer(opt, list(twin.parameters())),
        x,
        y,
        epochs=3,
        batch_size=16,
        seed=5,
    )
    np.testing.assert_allclose(history.step_losses, losses, rtol=1e-12)
    for k, v in sgt.state_dict_numpy(twin).items():
        np.testing.assert_allclose(model.state_dict()[k], v, rtol=1e-11, atol=1e-14)


def test_batch_order_is_a_seeded_partition():
    batches = batch_order(23, 5, seed=1, epoch=2)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert sorted(np.concatenate(batches).tolist()) == list(range(23))
    again = batch_order(23, 5, seed=1, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    other = batch_order(23, 5, seed=1, epoch=3)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other, strict=True))


@pytest.mark.parametrize("clip", [{}, {"clip_grad_norm": 0.5}, {"clip_grad_value": 0.01}])
def test_fit_compiles_the_step_and_agrees_with_the_op_by_op_path(clip):
    x, y = _data(50)  # a short last batch: a second shape of the same compiled step
    runs = {}
    for compiled in (None, False):
        model = _model(4)
        opt = optim.AdamW(model.parameters(), lr=1e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback for an MLP
            history = fit(model, nn.CrossEntropyLoss(), opt, x, y, epochs=2, batch_size=16,
                          compiled=compiled, **clip)  # fmt: skip
        runs[compiled] = history, model.state_dict()
    (h1, p1), (h2, p2) = runs[None], runs[False]
    np.testing.assert_allclose(h1.step_losses, h2.step_losses, rtol=1e-12)
    for k, v in p2.items():
        np.testing.assert_allclose(p1[k], v, rtol=1e-11, atol=1e-14)
        assert not np.array_equal(v, _model(4).state_dict()[k])


def test_fit_keeps_its_compiled_step_between_calls(monkeypatch):
    """A second ``fit`` of the same model and optimizer neither traces nor plans again; an
    edit of the model between calls is traced and trained as edited; a copy of the model
    leaves the step behind; another optimizer gets a step of its own."""
    import copy

    import symgrad.compile.step as step_module
    from symgrad.nn.modules import STEP_CACHE

    traced = []

    def counting(fn, arrays):
        traced.append(tuple(a.shape for a in arrays))
        return real(fn, arrays)

    real = step_module.trace
    monkeypatch.setattr(step_module, "trace", counting)
    x, y = _data(48)
    model, reference = _model(4), _model(4)
    opt, ref_opt = (optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference))

    def both() -> None:
        got = fit(model, nn.CrossEntropyLoss(), opt, x, y, epochs=1, batch_size=16)
        want = fit(reference, nn.CrossEntropyLoss(), ref_opt, x, y, epochs=1, batch_size=16,
                   compiled=False)  # fmt: skip
        np.testing.assert_allclose(got.step_losses, want.step_losses, rtol=1e-12)
        for k, v in reference.state_dict().items():
            np.testing.assert_allclose(model.state_dict()[k], v, rtol=1e-11, atol=1e-14)

    both()
    both()
    assert traced == [((16, 5), (16,))]
    kept = vars(model)[STEP_CACHE]
    # edits: a layer replaced by an equal one (traced again, found unchanged), then eval mode
    model[1], reference[1] = nn.Tanh(), nn.Tanh()
    both()
    model.eval()
    reference.eval()
    both()
    both()
    assert len(traced) == 3 and vars(model)[STEP_CACHE] is kept
    assert len(kept._bindings) == 1
    clone = copy.deepcopy(model)  # shares the ops, not the step
    assert STEP_CACHE not in vars(clone) and clone[0].weight is not model[0].weight
    np.testing.assert_array_equal(clone[0].weight.data, model[0].weight.data)
    fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1), x, y, epochs=1,
        batch_size=16)  # fmt: skip
    assert vars(model)[STEP_CACHE] is not kept and len(traced) == 4


def test_fit_calls_in_sequence_agree_with_the_op_by_op_path():
    """One model and optimizer through seven ``fit`` calls — another loss, clipping, a new
    rate, a frozen layer, weights loaded, a layer replaced by one the optimizer does not
    hold — trains as the op-by-op path does (clipping counts the optimizer's parameters
    only, on both paths)."""
    rng = np.random.default_rng(0)
    x, labels, targets = rng.normal(size=(40, 5)), rng.integers(0, 3, 40), rng.normal(size=(40, 3))

    def run(compiled):
        model = _model(1)
        opt = optim.Adam(model.parameters(), lr=1e-2)
        losses = []

        def call(loss, y, **options):
            history = fit(model, loss, opt, x, y, epochs=1, batch_size=16, compiled=compiled,
                          **options)  # fmt: skip
            losses.extend(history.step_losses)

        call(nn.CrossEntropyLoss(), labels)
        call(nn.MSELoss(), targets)
        call(nn.CrossEntropyLoss(), labels, clip_grad_norm=0.1)
        opt.param_groups[0]["lr"] = 0.05
        call(nn.CrossEntropyLoss(), labels, clip_grad_norm=0.1)
        model[0].requires_grad_(False)
        call(nn.CrossEntropyLoss(), labels, clip_grad_norm=0.1)
        model[0].requires_grad_(True)
        model.load_state_dict({k: v * 0.5 for k, v in model.state_dict().items()})
        call(nn.CrossEntropyLoss(), labels, clip_grad_norm=0.1)
        model[2] = nn.Linear(7, 3, dtype=np.float64, rng=np.random.default_rng(5))
        call(nn.CrossEntropyLoss(), labels, clip_grad_norm=0.1)
        return np.array(losses), model.state_dict()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every call compiled
        (got, got_state), (want, want_state) = run(None), run(False)
    assert len(got) == 21
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for k, v in want_state.items():
        np.testing.assert_allclose(got_state[k], v, rtol=1e-11, atol=1e-14)


def test_fit_falls_back_to_the_op_by_op_path_with_a_warning():
    class Opaque(nn.Module):  # no record: the step compiler cannot trace it
        def forward(self, x):
            return x, None

        def backward(self, ctx, grad_y, need_input_grad=True):
            return grad_y

    def model():
        return nn.Sequential(*_model(5), Opaque())

    x, y = _data()
    reference = model()
    fit(reference, nn.CrossEntropyLoss(), optim.SGD(reference.parameters(), lr=0.1), x, y,
        epochs=1, batch_size=8, compiled=False)  # fmt: skip
    fallback = model()
    with pytest.warns(StepFallbackWarning, match="Opaque does not record"):
        fit(fallback, nn.CrossEntropyLoss(), optim.SGD(fallback.parameters(), lr=0.1), x, y,
            epochs=1, batch_size=8)  # fmt: skip
    for k, v in reference.state_dict().items():
        np.testing.assert_array_equal(fallback.state_dict()[k], v)
    strict = model()
    before = strict.state_dict()
    with pytest.raises(UnsupportedStepError, match="Opaque"):
        fit(strict, nn.CrossEntropyLoss(), optim.SGD(strict.parameters(), lr=0.1), x, y,
            epochs=1, batch_size=8, compiled=True)  # fmt: skip
    for k, v in before.items():
        np.testing.assert_array_equal(strict.state_dict()[k], v)
    with pytest.raises(SymgradError, match="compiled must be True, False or None"):
        fit(strict, nn.CrossEntropyLoss(), optim.SGD(strict.parameters(), lr=0.1), x, y,
            epochs=1, batch_size=8, compiled="yes")  # fmt: skip


def test_frozen_parameters_do_not_change():
    x, y = _data()
    model = _model(1)
    model[0].requires_grad_(False)
    frozen = {k: v for k, v in model.state_dict().items() if k.startswith("0.")}
    fit(
        model,
        nn.CrossEntropyLoss(),
        optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        x,
        y,
        epochs=2,
        batch_size=8,
    )
    for k, v in frozen.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)
    assert not np.array_equal(model.state_dict()["2.weight"], _model(1).state_dict()["2.weight"])


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, name):
    x, y = _data()
    full = _model(2)
    fit(
        full,
        nn.CrossEntropyLoss(),
        finetune.make_optimizer(name, full.parameters()),
        x,
        y,
        epochs=4,
        batch_size=16,
        seed=3,
    )

    ckpt = tmp_path / "run.npz"
    part = _model(2)
    fit(
        part,
        nn.CrossEntropyLoss(),
        finetune.make_optimizer(name, part.parameters()),
        x,
        y,
        epochs=4,
        batch_size=16,
        seed=3,
        checkpoint=ckpt,
        stop_after_epoch=2,
    )
    resumed = _model(99)  # different weights: everything must come from the checkpoint
    history = fit(
        resumed,
        nn.CrossEntropyLoss(),
        finetune.make_optimizer(name, resumed.parameters()),
        x,
        y,
        epochs=4,
        batch_size=16,
        seed=3,
        checkpoint=ckpt,
        resume=True,
    )
    assert len(history.epoch_losses) == 4
    for k, v in full.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[k], v)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


@pytest.mark.parametrize(
    "x, y, error, match",
    [
        (np.full((4, 5), np.nan), np.zeros(4, dtype=int), DataError, "NaN"),
        (np.zeros((4, 5)), np.zeros(3, dtype=int), DataError, "4 inputs but 3"),
        (np.zeros((4, 6)), np.zeros(4, dtype=int), Exception, r"\(batch, 5\)"),
        (np.zeros((4, 5)), np.array([0, 1, 2, 7]), Exception, "labels must lie"),
    ],
)
def test_bad_data_fails_before_any_weight_changes(x, y, error, match):
    model = _model(3)
    before = model.state_dict()
    with pytest.raises(error, match=match):
        fit(
            model,
            nn.CrossEntropyLoss(),
            optim.SGD(model.parameters(), lr=0.1),
            x,
            y,
            epochs=1,
            batch_size=2,
        )
    for k, v in before.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)


def test_mnist_conversion_matches_sklearn_digit_format():
    x, y = load_mnist_8x8()
    assert x.shape == (5000, 64) and y.shape == (5000,)
    assert x.min() == 0 and x.max() == 16 and np.all(x == np.round(x))
    assert sorted(np.bincount(y)) == [500] * 10
    # a synthetic 28×28 image that is fully on maps to all-16 blocks
    assert np.all(to_sklearn_8x8(np.full((1, 784), 255.0)) == 16)


def test_few_shot_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), 10)
    train, test = few_shot_split(labels, 2, 0.5, seed=0)
    assert np.bincount(labels[train]).tolist() == [2] * 4
    assert np.bincount(labels[test]).tolist() == [5] * 4
    assert not set(train) & set(test)


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-9), ("float32", 1e-4)])
def test_finetune_task_agrees_with_torch(dtype, tolerance):
    cfg = finetune.FinetuneConfig(dtype=dtype, pretrain_epochs=1, epochs=5, optimizer="adam")
    report = finetune.run(cfg)
    assert report["max_loss_rel_diff"] <= tolerance
    assert report["max_param_rel_diff"] <= tolerance
    names = {p["name"] for p in report["phases"]}
    assert names == {"pretrain", "finetune", "kept_head", "scratch"}
    assert abs(report["symgrad_accuracy"] - report["torch_accuracy"]) < 0.01


def test_finetune_cli_writes_report_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "finetune",
            "--task",
            "digits",
            "--seeds",
            "2",
            "--pretrain-epochs",
            "1",
            "--epochs",
            "3",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
            "--quiet",
            "--freeze-body",
        ]
    )
    assert code == 0
    study = json.loads((tmp_path / "r.json").read_text())
    for key in (
        "max_loss_rel_diff",
        "max_param_rel_diff",
        "symgrad_accuracy",
        "torch_accuracy",
        "kept_head_accuracy",
        "scratch_accuracy",
    ):
        assert key in study
    assert study["seeds"] == [0, 1] and len(study["runs"]) == 2
    # the summary is computed from the runs: mean and spread of each seed's accuracy
    kept = [r["kept_head_accuracy"] for r in study["runs"]]
    assert study["summary"]["kept_head_accuracy"]["mean"] == pytest.approx(np.mean(kept))
    assert study["summary"]["kept_head_accuracy"]["std"] == pytest.approx(np.std(kept, ddof=1))
    gain = [r["kept_head_accuracy"] - r["scratch_accuracy"] for r in study["runs"]]
    assert study["kept_head_minus_scratch"]["values"] == pytest.approx(gain)
    assert (out / "finetune_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "agreement with torch within 1e-09: yes" in printed
    assert "held-out scikit-learn digits (never trained on)" in printed
    assert "mean ± standard deviation over 2 seeds" in printed


def test_the_check_before_training_runs_one_batch_through_the_model_and_every_label(
    monkeypatch,
):
    # floating-point rows fail the model only by their shape: one batch through it, not an
    # epoch's forward; the loss still sees every label
    model, (x, y) = _model(3), _data(40)
    seen: list[int] = []
    first, forward = model[0], model[0].forward
    monkeypatch.setattr(first, "forward", lambda rows: (seen.append(len(rows)), forward(rows))[1])
    opt = optim.SGD(model.parameters(), lr=0.1)
    check_fit_options(model, nn.CrossEntropyLoss(), opt, x, y, epochs=1, batch_size=16)
    assert seen == [16]
    y[-1] = 7  # in a row the model did not see
    with pytest.raises(Exception, match="labels must lie"):
        check_fit_options(model, nn.CrossEntropyLoss(), opt, x, y, epochs=1, batch_size=16)
