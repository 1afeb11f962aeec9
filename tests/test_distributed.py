"""Data-parallel training (symgrad.distributed) on 2 and 3 processes on 127.0.0.1, gloo.

The ranks run tests/distributed_worker.py, started by torchrun (and, where a rank must die or
hang with the others watching, by this file with torchrun's environment).  The one-process
references run here, without any process group: ``symgrad.train.fit``, op by op or compiled.
Timeouts are short, so that a failure never holds the suite.  Six launches in all (the
equivalence runs on 2 and on 3 ranks, a resume on 2 ranks, a killed rank, a hung rank, and
``symgrad finetune --nproc 2``): a rank's start-up (imports) is most of their time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker

from symgrad import nn, optim
from symgrad.distributed import (
    DistributedSampler,
    GradientReducer,
    SetupError,
    World,
    torchrun_command,
)

WORKER = str(Path(__file__).parent / "distributed_worker.py")
ROOT = str(Path(__file__).resolve().parent.parent)
LAUNCH_TIMEOUT = 300  # seconds for a whole launch (the machine may be loaded)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[name] = "1"
    env.update(extra)
    return env


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    """The worker on ``nproc`` ranks under torchrun (it must succeed)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", WORKER, *args]  # fmt: skip
    done = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ranks(nproc: int, *args: str, timeout: float) -> list[subprocess.Popen[str]]:
    """The ranks as plain processes with torchrun's environment (so that a survivor's own error
    is seen, not torchrun tearing it down)."""
    port = str(_free_port())
    return [
        subprocess.Popen(
            [sys.executable, WORKER, *args],
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                SYMGRAD_TEST_TIMEOUT=str(timeout),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(nproc)
    ]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch of 2 ranks; they also resume a checkpoint written by one process."""
    from symgrad.train import fit

    out = tmp_path_factory.mktemp("w2")
    model, opt, options = worker.setup("adamw-eager")
    x, y = worker.data()
    fit(model, nn.CrossEntropyLoss(), opt, x, y, checkpoint=out / "one.npz", stop_after_epoch=2,
        compiled=False, **options)  # fmt: skip
    _torchrun(2, "equivalence", str(out), str(out / "one.npz"))
    return out


@pytest.fixture(scope="module")
def runs3(runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch of 3 ranks (the last batch of each epoch, 2 rows, leaves the third rank a
    stand-in row of weight 0): the equivalence runs, and a resume of the 2 ranks' checkpoint
    of epoch 2; then 2 ranks resume the checkpoint the 3 ranks wrote after epoch 2."""
    out = tmp_path_factory.mktemp("w3")
    _torchrun(3, "three", str(out), str(runs / "half.npz"))
    back = out / "back"
    back.mkdir()
    _torchrun(2, "resume", str(back), str(out / "half.npz"))
    return out


@pytest.fixture(scope="module")
def references() -> dict[str, tuple[dict[str, np.ndarray], list[float]]]:
    found = {}
    for config in worker.CONFIGS:
        model, losses = worker.one_process(config)
        found[config] = (model.state_dict(), losses)
    return found


@pytest.mark.parametrize("config", worker.CONFIGS)
def test_two_processes_train_as_one_process(runs, references, config):
    """≥ 20 steps (the last batch split 1 + 1), schedule and clipping: the ranks' parameters
    equal one process's to 1e-12 and each other bit for bit."""
    params, losses = references[config]
    first = None
    for rank in range(2):
        got = np.load(runs / f"{config}.rank{rank}.npz")
        assert len(got["losses"]) == len(losses) >= 20
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-12)
        for name, want in params.items():
            assert _rel(got[f"p/{name}"], want) <= 1e-12, (rank, name)
            if first is not None:
                np.testing.assert_array_equal(got[f"p/{name}"], first[f"p/{name}"])
        first = first if first is not None else got


@pytest.mark.parametrize("config", worker.CONFIGS)
def test_three_processes_train_as_one_process(runs3, references, config):
    """As on 2 ranks, on 3: 24 steps, a last batch of 1 + 1 + a stand-in row of weight 0."""
    params, losses = references[config]
    first = None
    for rank in range(3):
        got = np.load(runs3 / f"{config}.rank{rank}.npz")
        assert len(got["losses"]) == len(losses) >= 20
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-12)
        for name, want in params.items():
            assert _rel(got[f"p/{name}"], want) <= 1e-12, (rank, name)
            if first is not None:
                np.testing.assert_array_equal(got[f"p/{name}"], first[f"p/{name}"])
        first = first if first is not None else got


def test_resume_between_two_and_three_ranks(runs3, references):
    """2 ranks → 3 ranks, 3 ranks → 2 ranks and 3 ranks → 1 process, each from the checkpoint
    of epoch 2: every run ends as the uninterrupted one-process run."""
    from symgrad.train import fit

    params, losses = references["adamw-eager"]
    for path, ranks in ((runs3, 3), (runs3 / "back", 2)):
        for rank in range(ranks):
            got = np.load(path / f"resumed.rank{rank}.npz")
            np.testing.assert_allclose(got["losses"], losses, rtol=1e-12)
            for name, want in params.items():
                assert _rel(got[f"p/{name}"], want) <= 1e-12, (path, rank, name)
    model, opt, options = worker.setup("adamw-eager")
    x, y = worker.data()
    history = fit(model, nn.CrossEntropyLoss(), opt, x, y, checkpoint=runs3 / "half.npz",
                  resume=True, compiled=False, **options)  # fmt: skip
    np.testing.assert_allclose(history.step_losses, losses, rtol=1e-12)
    for name, want in params.items():
        assert _rel(model.state_dict()[name], want) <= 1e-12


@pytest.mark.parametrize("ranks", [2, 3])
def test_the_minilm_task_step_on_several_ranks_is_the_one_process_step(runs, runs3, ranks):
    """``symgrad finetune --task sms-minilm --nproc N``'s step (the task's own code, on a tiny
    random 2-layer encoder at level b, float64): each rank runs the compiled step on its rows
    padded as the global batch, gradients summed in the step's grad_hook; 12 steps, a last
    batch of 1 row (stand-in rows of weight 0 on the others).  Losses, the epoch line's
    correct predictions and the trained weights are the one-process run's."""
    from symgrad.tasks.minilm import KEY_BIAS

    ours, losses, right = worker.minilm_run()
    want = ours.model().state_dict()
    for rank in range(ranks):
        path = runs if ranks == 2 else runs3
        got = np.load(path / f"minilm.rank{rank}.npz")
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-12)
        assert np.load(path / f"minilm-right.rank{rank}.npy").tolist() == right
        for name, value in want.items():
            # the key bias's exact gradient is 0 (softmax ignores a shift of a whole row, see
            # symgrad.tasks.minilm): Adam turns its rounding noise, summed in another order
            # here, into steps — 4e-12 after 12 steps; every other tensor within 1e-12
            tolerance = 1e-10 if name.endswith(KEY_BIAS) else 1e-12
            assert _rel(got[f"p/{name}"], value) <= tolerance, (rank, name)


def test_data_parallel_on_the_tape_with_buckets_sent_during_backward(runs, references):
    params, losses = references["sgd-eager"]
    for rank in range(2):
        got = np.load(runs / f"tape.rank{rank}.npz")
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-12)
        for name, want in params.items():
            assert _rel(got[f"p/{name}"], want) <= 1e-12


def test_the_runs_clip_and_schedule():
    """The configurations' clipping acts (without it the run differs), and the schedule moves."""
    for config in ("sgd-eager", "adamw-eager"):
        model, opt, options = worker.setup(config)
        options.pop("clip_grad_norm", None), options.pop("clip_grad_value", None)
        x, y = worker.data()
        from symgrad.train import fit

        fit(model, nn.CrossEntropyLoss(), opt, x, y, compiled=False, **options)
        clipped, _ = worker.one_process(config)
        assert _rel(model[0].weight.data, clipped[0].weight.data) > 1e-3
        assert options["scheduler"].get_last_lr()[0] != options["scheduler"].base_lrs[0]


def test_resume_with_another_number_of_ranks(runs, references):
    """1 process → 2 ranks: the ranks resume a one-process checkpoint of epoch 2; 2 ranks → 1
    process: this process resumes the ranks' checkpoint of epoch 2.  Both end as the
    uninterrupted run."""
    from symgrad.train import fit

    params, losses = references["adamw-eager"]
    for rank in range(2):
        got = np.load(runs / f"resumed.rank{rank}.npz")
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-12)
        for name, want in params.items():
            assert _rel(got[f"p/{name}"], want) <= 1e-12
    model, opt, options = worker.setup("adamw-eager")
    x, y = worker.data()
    history = fit(model, nn.CrossEntropyLoss(), opt, x, y, checkpoint=runs / "half.npz",
                  resume=True, compiled=False, **options)  # fmt: skip
    np.testing.assert_allclose(history.step_losses, losses, rtol=1e-12)
    for name, want in params.items():
        assert _rel(model.state_dict()[name], want) <= 1e-12


def test_a_different_model_or_version_is_refused_at_start(runs):
    for rank in range(2):
        structure = json.loads((runs / f"structure.rank{rank}.json").read_text())
        assert structure["type"] == "RankMismatchError"
        assert "rank 1 differs from rank 0 in its model structure" in structure["message"]
        assert "out_features=17" in structure["message"]
        version = json.loads((runs / f"version.rank{rank}.json").read_text())
        assert "in its symgrad version" in version["message"]
        assert "0.0.0-other" in version["message"]


@pytest.mark.parametrize("scenario", ["killed", "hung"])
def test_a_lost_rank_stops_the_others_with_a_clear_error(tmp_path, scenario):
    """Rank 1 dies (or hangs) in its 15th step, in epoch 3: rank 0 stops with a
    CollectiveError — at once when the rank died (its connections close), after the process
    group's timeout when it hangs — and the checkpoint of epoch 2 is whole."""
    timeout = 6.0
    ranks = _ranks(2, scenario, str(tmp_path), timeout=timeout)
    try:
        out, _ = ranks[0].communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert ranks[0].returncode == 3, out[-3000:]
    if scenario == "killed":
        assert ranks[1].returncode == 17
    error = json.loads((tmp_path / "error.rank0.json").read_text())
    assert error["type"] == "CollectiveError"
    assert "rank 0 of 2" in error["message"] and "died" in error["message"]
    assert "did not answer within 6 s" in error["message"]
    waited = error["time"] - json.loads((tmp_path / "lost.json").read_text())["time"]
    if scenario == "killed":
        assert waited < timeout
    else:  # given up after the timeout, not never (the margin: a loaded machine)
        assert timeout - 0.5 <= waited <= timeout + 30
    from symgrad.train import History, fit, load_checkpoint

    model, opt, options = worker.setup("sgd-eager")
    epoch, history = load_checkpoint(tmp_path / "ckpt.npz", model, opt, options["scheduler"])
    assert isinstance(history, History) and epoch == 2 and len(history.step_losses) == 12
    assert history.evals == [{"epoch_done": 1.0}] * 2
    ref_model, ref_opt, ref_options = worker.setup("sgd-eager")
    x, y = worker.data()
    options = {**ref_options, "epochs": 2}
    fit(ref_model, nn.CrossEntropyLoss(), ref_opt, x, y, compiled=False, **options)
    for name, want in ref_model.state_dict().items():
        assert _rel(model.state_dict()[name], want) <= 1e-12


# -- without processes ----------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_sampler_splits_the_one_process_batches(world):
    from symgrad.train import batch_order

    one = batch_order(23, 6, 4, 1)
    shards = [DistributedSampler(23, 6, rank=r, world_size=world, seed=4).shards(1)
              for r in range(world)]  # fmt: skip
    assert len(shards[0]) == len(one)
    for k, batch in enumerate(one):
        rows = [s[k] for s in shards]
        real = [r for r in rows if r.weight > 0]
        np.testing.assert_array_equal(np.sort(np.concatenate([r.indices for r in real])),
                                      np.sort(batch))  # fmt: skip
        assert sum(r.weight for r in rows) == pytest.approx(1.0, abs=1e-15)
        for r in rows:
            assert r.global_size == len(batch)
            assert r.weight == len(r.indices) / len(batch) or (r.weight == 0 and len(r.indices))


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_pad_and_drop_as_torch_distributed_sampler(world, drop_last):
    """With a per-rank batch b and global batch b·W, a rank's rows over the epoch are what
    torch's DistributedSampler (shuffle off, over our permutation) gives it."""
    import torch.utils.data as tud

    from symgrad.train import batch_order

    n, per_rank = 23, 2
    perm = np.concatenate(batch_order(n, 4, 9, 0))  # the epoch's permutation
    for rank in range(world):
        theirs = tud.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False,
                                        drop_last=drop_last)  # fmt: skip
        ours = DistributedSampler(n, per_rank * world, rank=rank, world_size=world, seed=9,
                                  last_batch="drop" if drop_last else "pad")  # fmt: skip
        mine = np.concatenate([s.indices for s in ours.shards(0) if s.weight > 0])
        np.testing.assert_array_equal(mine, perm[list(theirs)])


def test_sampler_refuses_bad_options():
    with pytest.raises(ValueError, match="last_batch must be one of split, pad, drop"):
        DistributedSampler(10, 2, rank=0, world_size=2, last_batch="keep")
    with pytest.raises(ValueError, match="need 0 ≤ rank < size"):
        DistributedSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="leaves none of 1 examples"):
        DistributedSampler(1, 2, rank=0, world_size=2, last_batch="drop")


def test_init_outside_torchrun_says_how_to_launch(monkeypatch):
    from symgrad.distributed import init

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SetupError, match="torchrun --nproc-per-node N"):
        init()
    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SetupError, match="RANK='x' is not an integer"):
        init()


def test_gradient_buckets_are_flat_views_in_reverse_layer_order():
    model = worker.mlp(hidden=40)
    params = model.parameters()  # W0 (40x6), b0, W2 (40x40), b2, W4 (3x40), b4
    reducer = GradientReducer(params, World(0, 1, 0, 10.0), bucket_bytes=900)
    assert not reducer.flats  # made by the first attach (a compiled step never needs them)
    reducer.attach()
    (flat,) = reducer.flats.values()
    assert flat.size == sum(p.data.size for p in params)
    # the last layer's gradients first, each a view of the one flat buffer
    offsets = [p.grad.__array_interface__["data"][0] for p in params[::-1]]
    assert offsets == sorted(offsets)
    assert all(np.shares_memory(p.grad, flat) for p in params)
    # buckets: consecutive parameters, closed once they hold ≥ 900 bytes
    assert [[p.shape for p in b.params] for b in reducer.buckets] == [
        [(3,), (3, 40)], [(40,), (40, 40)], [(40,), (40, 6)]
    ]
    assert sum(b.view.size for b in reducer.buckets) == flat.size
    reducer._flight = None
    reducer.detach()


def test_compiled_step_hook_sees_the_gradients_in_flat_buffers():
    """grad_hook runs between the backward pass and the update, on views of the step's flat
    gradient buffer (last layer first); what it does to them is what the update sees."""
    from symgrad.compile import compile_step

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 6)), rng.integers(0, 3, 10)
    model = worker.mlp()
    seen: list[list[np.ndarray]] = []

    def hook(grads: list[np.ndarray]) -> None:
        seen.append([g.copy() for g in grads])
        flats = step.flat_gradients()
        assert len(flats) == 1 and all(np.shares_memory(g, flats[0]) for g in grads)
        assert flats[0].size == sum(g.size for g in grads)
        starts = [g.__array_interface__["data"][0] for g in grads]  # layer order in, ...
        assert starts == sorted(starts, reverse=True)  # ... the last layer first in the buffer
        for g in grads:
            g *= 0.0  # the update sees zeros: plain SGD leaves the weights as they were

    step = compile_step(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.5),
                        grad_hook=hook)  # fmt: skip
    before = model.state_dict()
    step(x, y)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])
    # the gradients it saw, in the order of the parameters: the layer path's
    ref = worker.mlp()
    out, ctx = ref.forward(x)
    _, g = nn.CrossEntropyLoss().value_and_grad(out, y)
    ref.backward(ctx, g, need_input_grad=False)
    for got, p in zip(seen[0], ref.parameters(), strict=True):
        np.testing.assert_allclose(got, p.grad, rtol=1e-12, atol=1e-15)


def test_post_accumulate_hook_and_handle():
    p = nn.Parameter(np.zeros(3))
    calls: list[float] = []
    handle = p.register_post_accumulate_grad_hook(lambda q: calls.append(float(q.grad.sum())))
    p.accumulate(np.ones(3))
    p.accumulate(np.ones(3))
    handle.remove()
    p.accumulate(np.ones(3))
    assert calls == [3.0, 6.0]


def test_launcher_command_and_refusals(monkeypatch):
    from symgrad.distributed import launch

    command = torchrun_command(3, ["finetune", "--epochs", "1"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                           "-m", "symgrad", "finetune", "--epochs", "1"]  # fmt: skip
    with pytest.raises(SetupError, match="at least 1"):
        launch(0, [])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SetupError, match="drop --nproc"):
        launch(2, [])


# -- symgrad finetune on several processes --------------------------------------------------

FINETUNE = ["finetune", "--task", "digits", "--seeds", "1", "--pretrain-epochs", "1",
            "--epochs", "3", "--labels-per-class", "2", "--quiet"]  # fmt: skip


def test_finetune_digits_with_nproc_2_reports_as_one_process(tmp_path):
    """``symgrad finetune --task digits --nproc 2`` (torchrun, 2 ranks): rank 0's report is the
    one-process run's (the task's ``run_study`` here) — every step's loss within 1e-12 in
    float64, the same accuracies, the same torch twin — and only rank 0 prints and writes."""
    from symgrad.tasks import finetune

    cfg = finetune.FinetuneConfig(labels_per_class=2, pretrain_epochs=1, epochs=3)
    want = json.loads(finetune.to_json(finetune.run_study(cfg, seeds=1)))
    done = subprocess.run(
        [sys.executable, "-m", "symgrad", *FINETUNE, "--out", str(tmp_path), "--nproc", "2"],
        env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--nproc-per-node=2" in done.stderr  # what was launched
    assert done.stdout.count("Headline") == 1  # rank 0 alone prints
    assert done.stdout.count("symgrad trains on 2 processes") == 1
    assert "agreement with torch within 1e-09: yes" in done.stdout
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["finetune_losses.png", "finetune_report.json"]  # rank 0 alone writes
    got = json.loads((tmp_path / "finetune_report.json").read_text())
    assert (want["processes"], got["processes"]) == (1, 2)
    for key in ("symgrad_accuracy", "kept_head_accuracy", "scratch_accuracy", "torch_accuracy"):
        assert got[key] == want[key], key
    phases = zip(got["runs"][0]["phases"], want["runs"][0]["phases"], strict=True)
    for mine, ref in phases:
        assert len(mine["symgrad_losses"]) == len(ref["symgrad_losses"]) > 0
        np.testing.assert_allclose(mine["symgrad_losses"], ref["symgrad_losses"], rtol=1e-12)
        # the same twin on rank 0 (torch's own sums: one thread there, several here)
        np.testing.assert_allclose(mine["torch_losses"], ref["torch_losses"], rtol=1e-12)
        assert mine["symgrad_accuracy"] == ref["symgrad_accuracy"]
        assert mine["max_param_rel_diff"] <= 1e-9


def test_finetune_nproc_and_timeout_are_checked(monkeypatch, capsys):
    from symgrad.cli import _without_nproc, main

    with pytest.raises(SystemExit) as stopped:
        main([*FINETUNE, "--nproc", "0"])
    assert stopped.value.code == 2
    assert "--nproc: must be ≥ 1, got 0" in capsys.readouterr().err
    assert main([*FINETUNE, "--timeout", "30"]) == 2
    assert "--timeout applies to data-parallel runs only" in capsys.readouterr().err
    import importlib.util

    find_spec = importlib.util.find_spec
    with monkeypatch.context() as patch:  # as if torch were not installed
        no_torch = lambda name, *a: None if name == "torch" else find_spec(name, *a)  # noqa: E731
        patch.setattr(importlib.util, "find_spec", no_torch)
        assert main([*FINETUNE, "--nproc", "2"]) == 2
    assert "torch is not installed: pip install 'symgrad[torch]'" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*FINETUNE, "--nproc", "2"]) == 2
    assert "--nproc inside a torchrun job" in capsys.readouterr().err
    argv = ["--epochs", "3", "--nproc", "2", "--quiet", "--nproc=3", "--npr", "4", "--seed", "1"]
    assert _without_nproc(argv) == ["--epochs", "3", "--quiet", "--seed", "1"]
