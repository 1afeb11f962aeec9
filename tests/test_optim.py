"""Optimizers as torch users expect them: whole training runs against torch in float64.

Each optimizer × {a hyperparameter changed by hand mid-run, each scheduler} × {one group, two
groups with their own lr and weight decay} × {no clipping, by norm, by value}, through the eager
optimizer and through the compiled fused step: every parameter equals torch's to 1e-12
(relative) after 50 steps.  The eager and fused paths share their compiled kernels through the
disk cache (two update kernels, six fused steps), so the product stays fast.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import symgrad.torch as sgt
from symgrad import nn, optim
from symgrad.compile import compile_step
from symgrad.errors import HyperparameterError, OptimizerError, SchedulerError, SymgradError
from symgrad.nn.utils import clip_grad_norm_, clip_grad_value_
from symgrad.optim import lr_scheduler as sched

pytestmark = pytest.mark.usefixtures("torch_state", "one_torch_thread")


@pytest.fixture
def one_torch_thread():
    """torch on one thread: its small kernels only slow down on a shared machine otherwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

STEPS = 50
MAX_NORM, CLIP_VALUE = 0.3, 0.02

OPTIMIZERS = {
    "sgd": ("SGD", {"lr": 0.05}),
    "sgd_momentum": ("SGD", {"lr": 0.05, "momentum": 0.9}),
    "sgd_nesterov": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "sgd_dampening_wd": (
        "SGD", {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.01}
    ),
    "adam": ("Adam", {"lr": 0.01, "weight_decay": 0.01}),
    "adamw": ("AdamW", {"lr": 0.01, "weight_decay": 0.05}),
    "adam_amsgrad": ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "amsgrad": True}),
}


def _warmup(lib, opt):
    if lib is torch.optim.lr_scheduler:
        from transformers import get_linear_schedule_with_warmup
    else:
        get_linear_schedule_with_warmup = lib.get_linear_schedule_with_warmup
    return get_linear_schedule_with_warmup(opt, 10, 40)


def _sequential(lib, opt):
    warm = lib.LinearLR(opt, start_factor=0.1, total_iters=8)
    return lib.SequentialLR(opt, [warm, lib.ExponentialLR(opt, gamma=0.95)], milestones=[8])


def _one_cycle(lib, opt):
    top = [2 * g["lr"] for g in opt.param_groups]
    return lib.OneCycleLR(opt, max_lr=top, total_steps=STEPS)


#: name → (library, optimizer) → scheduler, the same call for symgrad's and torch's module;
#: None: no scheduler, hyperparameters changed by hand mid-run instead.
SCHEDULES = {
    "changed_by_hand": None,
    "lambda": lambda lib, opt: lib.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s)),
    "step": lambda lib, opt: lib.StepLR(opt, step_size=10, gamma=0.5),
    "multistep": lambda lib, opt: lib.MultiStepLR(opt, milestones=[10, 25, 25, 40], gamma=0.5),
    "exponential": lambda lib, opt: lib.ExponentialLR(opt, gamma=0.97),
    "cosine": lambda lib, opt: lib.CosineAnnealingLR(opt, T_max=20, eta_min=1e-4),
    "linear": lambda lib, opt: lib.LinearLR(opt, start_factor=0.25, total_iters=15),
    "one_cycle": _one_cycle,
    "sequential": _sequential,
    "warmup_linear_decay": _warmup,
}


def _by_hand(groups, step, kind):
    """Change hyperparameters between steps, the same on both sides."""
    if step == 20:
        for g in groups:
            g["lr"] *= 0.5
    if step == 35:
        for g in groups:
            if kind == "SGD":
                g["momentum"] = 0.5 if g["momentum"] == 0 else g["momentum"] * 0.9
                g["weight_decay"] = 0.02
            else:
                g["betas"] = (0.85, 0.99)
                g["weight_decay"] = 0.03


def _model(dtype=np.float64):
    rng = np.random.default_rng(1)
    return nn.Sequential(
        nn.Linear(5, 8, dtype=dtype, rng=rng), nn.Tanh(), nn.Linear(8, 3, dtype=dtype, rng=rng)
    )


def _batches(dtype=np.float64):
    rng = np.random.default_rng(7)
    return [
        (rng.normal(size=(16, 5)).astype(dtype), rng.integers(0, 3, 16)) for _ in range(STEPS)
    ]


def _groups(params, two):
    if not two:
        return params
    return [{"params": params[:2], "lr": 0.02, "weight_decay": 0.02}, {"params": params[2:]}]


def _run_torch(opt_name, schedule, two, clip, dtype=torch.float64):
    kind, kwargs = OPTIMIZERS[opt_name]
    twin = sgt.to_torch(_model(np.float64 if dtype == torch.float64 else np.float32)).to(dtype)
    opt = getattr(torch.optim, kind)(_groups(list(twin.parameters()), two), **kwargs)
    make = SCHEDULES[schedule]
    scheduler = make(torch.optim.lr_scheduler, opt) if make else None
    loss_fn = torch.nn.CrossEntropyLoss()
    norms = []
    for step, (x, y) in enumerate(_batches()):
        if make is None:
            _by_hand(opt.param_groups, step, kind)
        opt.zero_grad()
        loss = loss_fn(twin(torch.from_numpy(x).to(dtype)), torch.from_numpy(y))
        loss.backward()
        if clip == "norm":
            norms.append(float(torch.nn.utils.clip_grad_norm_(twin.parameters(), MAX_NORM)))
        elif clip == "value":
            torch.nn.utils.clip_grad_value_(twin.parameters(), CLIP_VALUE)
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return [p.detach().numpy() for p in twin.parameters()], norms, opt


def _run_symgrad(opt_name, schedule, two, clip, fused, dtype=np.float64):
    kind, kwargs = OPTIMIZERS[opt_name]
    model = _model(dtype)
    params = model.parameters()
    opt = getattr(optim, kind)(_groups(params, two), **kwargs)
    make = SCHEDULES[schedule]
    scheduler = make(sched, opt) if make else None
    loss = nn.CrossEntropyLoss()
    clips = {"clip_grad_norm": MAX_NORM} if clip == "norm" else {}
    clips.update({"clip_grad_value": CLIP_VALUE} if clip == "value" else {})
    step_fn = compile_step(model, loss, opt, **clips) if fused else None
    norms = []
    for step, (x, y) in enumerate(_batches(dtype)):
        if make is None:
            _by_hand(opt.param_groups, step, kind)
        if step_fn is not None:
            step_fn(x, y)
            if clip == "norm":
                norms.append(step_fn.grad_norm)
        else:
            opt.zero_grad()
            out, ctx = model.forward(x)
            _, grad = loss.value_and_grad(out, y)
            model.backward(ctx, grad, need_input_grad=False)
            if clip == "norm":
                norms.append(clip_grad_norm_(params, MAX_NORM))
            elif clip == "value":
                clip_grad_value_(params, CLIP_VALUE)
            opt.step()
        if scheduler is not None:
            scheduler.step()
    return [p.data for p in params], norms, opt


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


#: (two parameter groups, clipping) of each run: every optimizer and schedule meets one and two
#: groups, and no clipping, clipping by norm and by value.
CONFIGS = [(False, None), (True, None), (False, "value"), (True, "norm")]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_training_runs_equal_torch(opt_name, schedule):
    """50 steps of the eager optimizer and of the fused step, each against torch."""
    for two, clip in CONFIGS:
        theirs, their_norms, topt = _run_torch(opt_name, schedule, two, clip)
        for path in ("eager", "fused"):
            where = (
                f"{path}: {opt_name}, {schedule}, {'two groups' if two else 'one group'}, "
                f"clip={clip}"
            )
            ours, our_norms, opt = _run_symgrad(opt_name, schedule, two, clip, path == "fused")
            for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                assert _rel(a, b) <= 1e-12, f"{where}: parameter {k} differs by {_rel(a, b):.1e}"
            if clip == "norm":  # the norm before clipping, and clipping was active
                assert _rel(np.array(our_norms), np.array(their_norms)) <= 1e-12, where
                assert max(their_norms) > MAX_NORM, where
            for mine, their in zip(opt.param_groups, topt.param_groups, strict=True):
                assert mine["lr"] == pytest.approx(their["lr"], rel=1e-15), where


@pytest.mark.parametrize("opt_name", ["sgd_nesterov", "adamw"])
@pytest.mark.parametrize("path", ["eager", "fused"])
def test_float32_runs_follow_torch(opt_name, path):
    theirs, _, _ = _run_torch(opt_name, "warmup_linear_decay", True, "norm", torch.float32)
    ours, _, _ = _run_symgrad(opt_name, "warmup_linear_decay", True, "norm", path == "fused",
                              np.float32)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == np.float32
        assert _rel(a, b) < 1e-4  # float32 rounding, 50 steps


def test_eager_and_fused_steps_can_alternate():
    """The fused step keeps the optimizer's state where the eager one does: mixing them, with
    a scheduler, equals torch."""
    theirs, _, _ = _run_torch("adam", "cosine", True, "norm")
    model = _model()
    params = model.parameters()
    _, kwargs = OPTIMIZERS["adam"]
    opt = optim.Adam(_groups(params, True), **kwargs)
    scheduler = sched.CosineAnnealingLR(opt, T_max=20, eta_min=1e-4)
    loss = nn.CrossEntropyLoss()
    fused = compile_step(model, loss, opt, clip_grad_norm=MAX_NORM)
    for step, (x, y) in enumerate(_batches()):
        if step % 3 == 0:
            fused(x, y)
        else:
            opt.zero_grad()
            out, ctx = model.forward(x)
            model.backward(ctx, loss.value_and_grad(out, y)[1], need_input_grad=False)
            clip_grad_norm_(params, MAX_NORM)
            opt.step()
        scheduler.step()
    for a, b in zip([p.data for p in params], theirs, strict=True):
        assert _rel(a, b) <= 1e-12


# -- schedulers alone: the rates, step by step -------------------------------------------------

RATE_SCHEDULES = {
    **{k: v for k, v in SCHEDULES.items() if v is not None},
    "constant": lambda lib, opt: lib.ConstantLR(opt, factor=0.5, total_iters=7),
    "multiplicative": lambda lib, opt: lib.MultiplicativeLR(opt, lambda s: 0.95),
    "polynomial": lambda lib, opt: lib.PolynomialLR(opt, total_iters=30, power=2.0),
    "chained": lambda lib, opt: lib.ChainedScheduler(
        [lib.ConstantLR(opt, factor=0.5, total_iters=5), lib.ExponentialLR(opt, gamma=0.9)]
    ),
    "warm_restarts": lambda lib, opt: lib.CosineAnnealingWarmRestarts(opt, T_0=7, T_mult=2),
    "one_cycle_linear_three_phase": lambda lib, opt: lib.OneCycleLR(
        opt, max_lr=0.5, epochs=5, steps_per_epoch=10, anneal_strategy="linear",
        three_phase=True,
    ),
}


@pytest.mark.parametrize("name", list(RATE_SCHEDULES))
def test_scheduler_rates_equal_torch_and_resume_from_state_dict(name):
    """Every rate (and cycled momentum or beta1) equals torch's, bit for bit; a scheduler
    rebuilt from a state dict mid-schedule carries on exactly."""
    make = RATE_SCHEDULES[name]
    tp = [torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)]
    groups = [{"params": [tp[0]], "lr": 0.1}, {"params": [tp[1]], "lr": 0.03, "momentum": 0.5}]
    topt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    mine = [nn.Parameter(np.zeros(2)), nn.Parameter(np.zeros(3))]
    opt = optim.SGD(
        [{"params": [mine[0]], "lr": 0.1}, {"params": [mine[1]], "lr": 0.03, "momentum": 0.5}],
        lr=0.1, momentum=0.9,
    )
    theirs, ours = make(torch.optim.lr_scheduler, topt), make(sched, opt)
    for step in range(STEPS):
        assert ours.get_last_lr() == theirs.get_last_lr(), f"step {step}"
        for g, tg in zip(opt.param_groups, topt.param_groups, strict=True):
            assert (g["lr"], g["momentum"]) == (tg["lr"], tg["momentum"]), f"step {step}"
        topt.step()
        theirs.step()
        ours.step()
        if step == 22:  # resume: a new optimizer and scheduler, their state dicts loaded
            saved_opt = opt.state_dict()
            saved = ours.state_dict()
            opt = optim.SGD([{"params": [mine[0]]}, {"params": [mine[1]]}], lr=0.1, momentum=0.9)
            ours = make(sched, opt)
            opt.load_state_dict(saved_opt)
            ours.load_state_dict(saved)
    assert ours.get_last_lr() == theirs.get_last_lr()
    assert getattr(ours, "last_epoch", None) == getattr(theirs, "last_epoch", None)


def test_reduce_on_plateau_follows_torch_and_fit_steps_it_with_the_epoch_loss():
    metrics = [1.0, 0.9, 0.95, 0.97, 0.96, 0.99, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.1]
    topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    kwargs = {"factor": 0.5, "patience": 2, "cooldown": 1, "min_lr": 0.02}
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kwargs)
    ours = sched.ReduceLROnPlateau(opt, **kwargs)
    for metric in metrics:
        theirs.step(metric)
        ours.step(metric)
        assert ours.get_last_lr() == theirs.get_last_lr()
    assert ours.get_last_lr()[0] < 0.1  # the metrics did trigger reductions
    from symgrad.train import fit

    rng = np.random.default_rng(0)
    model = _model()
    opt = optim.SGD(model.parameters(), lr=1e-3)
    plateau = sched.ReduceLROnPlateau(opt, patience=0, threshold=0.5)  # no epoch halves the loss
    fit(model, nn.CrossEntropyLoss(), opt, rng.normal(size=(20, 5)), rng.integers(0, 3, 20),
        epochs=3, batch_size=10, scheduler=plateau)
    assert plateau.last_epoch == 3 and opt.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_clip_grad_norm_of_any_order_as_torch():
    rng = np.random.default_rng(8)
    grads = [rng.normal(size=(3, 4)), rng.normal(size=5)]
    for order in (2.0, 1.0, 3.5, float("inf"), "inf"):
        params = [nn.Parameter(np.zeros_like(g)) for g in grads]
        tparams = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
        for p, tp, g in zip(params, tparams, grads, strict=True):
            p.grad, tp.grad = g.copy(), torch.tensor(g)
        total = clip_grad_norm_(params, 0.5, norm_type=order)
        want = torch.nn.utils.clip_grad_norm_(tparams, 0.5, norm_type=order)
        assert total.item() == pytest.approx(want.item(), rel=1e-14)
        for p, tp in zip(params, tparams, strict=True):
            assert _rel(p.grad, tp.grad.numpy()) < 1e-14
    p = nn.Parameter(np.zeros(2))
    p.grad = np.array([np.inf, 1.0])
    with pytest.raises(SymgradError, match="not finite"):
        clip_grad_norm_(p, 1.0, error_if_nonfinite=True)


def test_warmup_schedule_is_hugging_faces():
    from transformers import get_linear_schedule_with_warmup

    p = torch.zeros(1, requires_grad=True)
    topt = torch.optim.AdamW([p], lr=5e-5)
    theirs = get_linear_schedule_with_warmup(topt, 3, 10)
    opt = optim.AdamW([nn.Parameter(np.zeros(1))], lr=5e-5)
    ours = sched.get_linear_schedule_with_warmup(opt, 3, 10)
    rates = []
    for _ in range(12):
        assert ours.get_last_lr() == theirs.get_last_lr()
        rates.append(ours.get_last_lr()[0])
        topt.step()
        theirs.step()
        ours.step()
    assert rates[0] == 0.0 and rates[3] == 5e-5 and rates[10] == 0.0 and rates[11] == 0.0
    assert rates[1] < rates[2] < rates[3] > rates[4] > rates[9]


def test_scheduler_step_with_an_epoch_uses_the_closed_form():
    for make in (
        lambda lib, o: lib.StepLR(o, 3, 0.5),
        lambda lib, o: lib.ExponentialLR(o, 0.9),
        lambda lib, o: lib.CosineAnnealingLR(o, 10),
    ):
        topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
        theirs, ours = make(torch.optim.lr_scheduler, topt), make(sched, opt)
        with pytest.warns(UserWarning):
            theirs.step(7)
        ours.step(7)
        assert ours.get_last_lr() == theirs.get_last_lr()


# -- checkpoints ----------------------------------------------------------------------------------


def _digits_run(tmp_path, stop=None, resume=False):
    from symgrad.train import fit

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = rng.integers(0, 3, 60)
    model = _model()
    params = model.parameters()
    opt = optim.AdamW(
        [{"params": params[:2], "lr": 3e-3, "weight_decay": 0.0}, {"params": params[2:]}],
        lr=1e-2,
    )
    schedule = sched.get_linear_schedule_with_warmup(opt, 5, 4 * 4)
    history = fit(
        model, nn.CrossEntropyLoss(), opt, x, y, epochs=4, batch_size=16, seed=3,
        checkpoint=tmp_path / "run.npz", resume=resume, stop_after_epoch=stop,
        scheduler=schedule, clip_grad_norm=0.5,
    )
    return model, opt, schedule, history


def test_a_run_resumed_mid_schedule_equals_the_uninterrupted_run(tmp_path):
    full_model, full_opt, full_sched, full_history = _digits_run(tmp_path / "full")
    _digits_run(tmp_path / "part", stop=2)
    model, opt, schedule, history = _digits_run(tmp_path / "part", resume=True)
    assert history.step_losses == full_history.step_losses
    for k, v in full_model.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[k], v)
    assert schedule.state_dict() == full_sched.state_dict()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in full_opt.param_groups]
    saved, expected = opt.state_dict(), full_opt.state_dict()
    for index, state in expected["state"].items():
        for name, value in state.items():
            np.testing.assert_array_equal(saved["state"][index][name], value)
    assert full_sched.last_epoch == 16


def test_checkpoint_without_scheduler_state_is_refused(tmp_path):
    from symgrad.train import fit

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    model = _model()
    opt = optim.SGD(model.parameters(), lr=0.1)
    fit(model, nn.CrossEntropyLoss(), opt, x, y, epochs=1, batch_size=10,
        checkpoint=tmp_path / "c.npz")
    with pytest.raises(SchedulerError, match="no scheduler state"):
        fit(model, nn.CrossEntropyLoss(), opt, x, y, epochs=2, batch_size=10,
            checkpoint=tmp_path / "c.npz", resume=True,
            scheduler=sched.StepLR(opt, step_size=1))


def test_epoch_interval_and_checkpoints_of_the_earlier_layout(tmp_path):
    """``scheduler_interval="epoch"`` steps once per epoch; a checkpoint written before
    parameter groups (flat ``optim/<index>.<name>`` arrays) still restores the state."""
    from symgrad.train import fit, load_checkpoint

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    model = _model()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = sched.StepLR(opt, step_size=1, gamma=0.5)
    fit(model, nn.CrossEntropyLoss(), opt, x, y, epochs=3, batch_size=5, scheduler=schedule,
        scheduler_interval="epoch")
    assert schedule.last_epoch == 3 and opt.param_groups[0]["lr"] == 0.1 * 0.5**3
    buffers = {k: opt.state[p]["momentum_buffer"] for k, p in enumerate(model.parameters())}
    old = {f"model/{k}": v for k, v in model.state_dict().items()}
    old.update({f"optim/{k}.momentum_buffer": v for k, v in buffers.items()})
    old.update(epoch=np.asarray(3), step_losses=np.zeros(12), epoch_losses=np.zeros(3),
               evals=np.asarray("[]"))
    np.savez(tmp_path / "old.npz", **old)
    other = _model()
    other_opt = optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    epoch, _ = load_checkpoint(tmp_path / "old.npz", other, other_opt)
    assert epoch == 3
    for k, p in enumerate(other.parameters()):
        np.testing.assert_array_equal(other_opt.state[p]["momentum_buffer"], buffers[k])


def test_state_dict_has_torchs_layout_and_loads_torchs():
    """Keys and layout as torch's; a torch state dict (tensors as arrays) loads and the two
    optimizers carry on alike."""
    rng = np.random.default_rng(4)
    data = [rng.normal(size=(3, 2)), rng.normal(size=4)]
    tparams = [torch.tensor(d, requires_grad=True) for d in data]
    params = [nn.Parameter(d.copy()) for d in data]
    groups = lambda ps: [{"params": [ps[0]], "lr": 0.01}, {"params": [ps[1]]}]  # noqa: E731
    topt = torch.optim.Adam(groups(tparams), lr=0.1, amsgrad=True)
    opt = optim.Adam(groups(params), lr=0.1, amsgrad=True)
    for _ in range(3):
        grads = [rng.normal(size=d.shape) for d in data]
        for p, tp, g in zip(params, tparams, grads, strict=True):
            p.grad, tp.grad = g.copy(), torch.tensor(g)
        opt.step()
        topt.step()
    ours, theirs = opt.state_dict(), topt.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for k in ours["state"]:
        assert ours["state"][k].keys() == theirs["state"][k].keys()
        assert ours["state"][k]["step"] == float(theirs["state"][k]["step"])
    for mine, their in zip(ours["param_groups"], theirs["param_groups"], strict=True):
        assert mine["params"] == their["params"]
        assert {k: v for k, v in their.items() if k in mine} == mine
    loaded = {
        "state": {
            k: {n: v.numpy() for n, v in s.items()} for k, s in theirs["state"].items()
        },
        "param_groups": theirs["param_groups"],
    }
    fresh = [nn.Parameter(p.detach().numpy().copy()) for p in tparams]
    other = optim.Adam(groups(fresh), lr=0.1, amsgrad=True)
    other.load_state_dict(loaded)
    grads = [rng.normal(size=d.shape) for d in data]
    for p, tp, g in zip(fresh, tparams, grads, strict=True):
        p.grad, tp.grad = g.copy(), torch.tensor(g)
    other.step()
    topt.step()
    for p, tp in zip(fresh, tparams, strict=True):
        assert _rel(p.data, tp.detach().numpy()) < 1e-15


# -- errors ---------------------------------------------------------------------------------------

_P, _Q = nn.Parameter(np.zeros(2)), nn.Parameter(np.zeros(3))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: optim.SGD([_P], lr=-0.1), r"param group 0: invalid learning rate lr: -0\.1"),
        (
            lambda: optim.SGD([{"params": [_P]}, {"params": [_Q], "lr": -2.5}], lr=0.1),
            r"param group 1: invalid learning rate lr: -2\.5",
        ),
        (lambda: optim.SGD([_P], momentum=-0.5), r"param group 0: invalid momentum: -0\.5"),
        (lambda: optim.SGD([_P], weight_decay=-1), r"param group 0: invalid weight_decay: -1"),
        (
            lambda: optim.SGD([_P], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
            r"param group 0: Nesterov momentum requires .* dampening=0\.1",
        ),
        (lambda: optim.SGD([_P], lr="fast"), r"param group 0: invalid learning rate lr: 'fast'"),
        (lambda: optim.SGD([_P], nesterov="yes"), r"param group 0: invalid nesterov: 'yes'"),
        (
            lambda: optim.Adam([{"params": [_P]}, {"params": [_Q], "betas": (1.0, 0.9)}]),
            r"param group 1: invalid beta betas\[0\]: 1\.0",
        ),
        (lambda: optim.Adam([_P], betas=(0.9,)), r"param group 0: invalid betas: \(0\.9,\)"),
        (lambda: optim.AdamW([_P], eps=-1e-8), r"param group 0: invalid epsilon eps: -1e-08"),
        (lambda: optim.Adam([_P], lr=float("nan")), r"param group 0: .* lr: nan"),
    ],
)
def test_bad_hyperparameters_name_the_group_and_the_value(build, message):
    with pytest.raises(HyperparameterError, match=message) as info:
        build()
    assert isinstance(info.value, ValueError) and isinstance(info.value, SymgradError)


def test_a_bad_value_set_between_steps_is_refused_before_anything_changes():
    model = _model()
    params = model.parameters()
    opt = optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, momentum=0.9)
    x, y = _batches()[0]
    fused = compile_step(model, nn.CrossEntropyLoss(), opt)
    fused(x, y)
    opt.param_groups[1]["momentum"] = -0.9
    before = model.state_dict()
    state = {id(p): {k: v.copy() for k, v in opt.state[p].items()} for p in params}
    with pytest.raises(HyperparameterError, match=r"param group 1: invalid momentum: -0\.9"):
        fused(x, y)
    for p in params:
        p.grad = np.ones_like(p.data)
    with pytest.raises(HyperparameterError, match=r"param group 1: invalid momentum: -0\.9"):
        opt.step()
    for k, v in before.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)
    for p in params:
        for k, v in state[id(p)].items():
            np.testing.assert_array_equal(opt.state[p][k], v)


def test_parameter_group_errors():
    with pytest.raises(OptimizerError, match="empty parameter list"):
        optim.SGD([], lr=0.1)
    with pytest.raises(OptimizerError, match="more than one parameter group"):
        optim.SGD([{"params": [_P]}, {"params": [_P, _Q]}])
    with pytest.raises(OptimizerError, match="lists a parameter twice"):
        optim.SGD([_P, _P])
    with pytest.raises(SymgradError, match="not a set"):
        optim.SGD({_P, _Q})  # type: ignore[arg-type]
    with pytest.raises(SymgradError, match="wrap it in a list"):
        optim.SGD(_P)  # type: ignore[arg-type]
    opt = optim.SGD([_P], lr=0.1)
    with pytest.raises(HyperparameterError, match=r"param group 1: invalid learning rate"):
        opt.add_param_group({"params": [_Q], "lr": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(OptimizerError, match=r"param_groups\[k\]\['lr'\]"):
        opt.lr = 1.0  # the silent no-op torch users fear: refused, with the fix
    with pytest.raises(AttributeError, match=r"param_groups\[k\]\['lr'\]"):
        _ = opt.lr
    other = optim.SGD([_Q], lr=0.1)
    with pytest.raises(OptimizerError, match=r"2 parameter group\(s\), the optimizer 1"):
        other.load_state_dict(optim.SGD([{"params": [_P]}, {"params": [_Q]}]).state_dict())


def test_scheduler_errors():
    opt = optim.SGD([_P], lr=0.1)
    with pytest.raises(SchedulerError, match="step_size"):
        sched.StepLR(opt, step_size=0)
    with pytest.raises(SchedulerError, match="one milestone fewer"):
        sched.SequentialLR(opt, [sched.StepLR(opt, 2), sched.StepLR(opt, 3)], milestones=[])
    with pytest.raises(SchedulerError, match="2 values"):
        sched.OneCycleLR(opt, max_lr=[0.1, 0.2], total_steps=5)
    cycle = sched.OneCycleLR(opt, max_lr=0.1, total_steps=2)
    cycle.step()
    cycle.step()
    with pytest.raises(SchedulerError, match="total_steps=2"):
        cycle.step()
    with pytest.raises(SymgradError, match="not a symgrad optimizer"):
        sched.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), 2)


# -- the general mechanism: a user's own update rule -------------------------------------------


def _sign_momentum_rule():
    """Lion-like: update with the sign of an interpolated momentum (a user's optimizer)."""
    from symgrad.symbolic.update import Formulas, Hyperparameter, State, UpdateRule

    def build():
        import sympy as sp

        p, g, m, lr, b1, b2, wd = sp.symbols(
            "param grad exp_avg lr beta1 beta2 weight_decay", real=True
        )
        c = sp.Symbol("c", real=True)
        return Formulas(
            scalars=(),
            updates=(
                (c, b1 * m + (1 - b1) * g),
                (p, p * (1 - lr * wd) - lr * sp.sign(c)),
                (m, b2 * m + (1 - b2) * g),
            ),
        )

    return UpdateRule(
        name="user_lion",
        hyperparameters=(
            Hyperparameter("lr", "lr"),
            Hyperparameter("beta1", "betas", 0),
            Hyperparameter("beta2", "betas", 1),
            Hyperparameter("weight_decay", "weight_decay"),
        ),
        states=(State("exp_avg"),),
        counter=None,
        build=build,
    )


class _Lion(optim.Optimizer):
    rule = _sign_momentum_rule()

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})


def _lion_reference(p, grads, lr, b1, b2, wd):
    m = np.zeros_like(p)
    for g in grads:
        c = b1 * m + (1 - b1) * g
        p = p * (1 - lr * wd) - lr * np.sign(c)
        m = b2 * m + (1 - b2) * g
    return p


def test_a_users_update_rule_runs_eager_and_fused():
    rng = np.random.default_rng(5)
    w = nn.Parameter(rng.normal(size=(3, 4)))
    start = w.data.copy()
    opt = _Lion([w], lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    grads = [rng.normal(size=(3, 4)) for _ in range(5)]
    for g in grads:
        w.grad = g.copy()
        opt.step()
    want = _lion_reference(start, grads, 0.01, 0.8, 0.95, 0.1)
    assert _rel(w.data, want) < 1e-14
    # the same rule inside a compiled step equals the eager optimizer, step by step
    a, b = _model(), _model()
    opt_a, opt_b = _Lion(a.parameters(), lr=0.01), _Lion(b.parameters(), lr=0.01)
    fused = compile_step(b, nn.CrossEntropyLoss(), opt_b)
    loss = nn.CrossEntropyLoss()
    for x, y in _batches()[:5]:
        opt_a.zero_grad()
        out, ctx = a.forward(x)
        a.backward(ctx, loss.value_and_grad(out, y)[1], need_input_grad=False)
        opt_a.step()
        fused(x, y)
    for k, v in a.state_dict().items():
        assert _rel(b.state_dict()[k], v) < 1e-13


def test_update_kernels_are_forward_only_and_rules_are_checked():
    from symgrad.errors import DefinitionError
    from symgrad.runtime.update import update_kernel
    from symgrad.symbolic.update import Formulas, State, UpdateRule

    for rule in (optim.SGD_RULE, optim.ADAM_RULE):
        source = update_kernel(rule, np.dtype(np.float64)).source
        assert source.count("def ") == 1 and "def update(" in source and "vjp" not in source

    def undeclared():
        import sympy as sp

        p, g, lr = sp.symbols("param grad lr", real=True)
        return Formulas((), ((p, p - lr * g),))

    with pytest.raises(DefinitionError, match=r"\['lr'\]"):
        UpdateRule("bad", (), (), None, undeclared).formulas()

    def reads_inactive():
        import sympy as sp

        p, g, b, mu = sp.symbols("param grad buf mu", real=True)
        return Formulas((), ((b, mu * b + g), (p, p - b)))

    from symgrad.codegen.loops import Loops
    from symgrad.codegen.update import update_lines
    from symgrad.symbolic.update import Hyperparameter

    rule = UpdateRule(
        "bad_switch", (Hyperparameter("mu", "mu"),), (State("buf", active_if="mu"),), None,
        reads_inactive,
    )
    names = {n: n for n in (*rule.array_inputs, *rule.scalar_inputs)}
    with pytest.raises(DefinitionError, match=r"with mu = 0 the update of param still reads"):
        update_lines(Loops("t"), rule, names, names, "    ")
