"""One rank of the data-parallel tests (tests/test_distributed.py), started by torchrun or by the
test with torchrun's environment: ``python distributed_worker.py SCENARIO OUT_DIR [ARG]``.

Also imported by the tests for the one-process references (the same models, data, options).
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from symgrad import nn, optim

# 6 steps per epoch, the last of 2 rows: 1 + 1 on two ranks; 1 + 1 + none on three (the third
# rank runs a stand-in row with weight 0); the others 4 + 4 and 3 + 3 + 2
N, BATCH, EPOCHS = 42, 8, 4
CONFIGS = ["sgd-eager", "adamw-eager", "sgd-compiled", "adamw-compiled"]


def data(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.normal(size=(n, 6)), rng.integers(0, 3, n)


def mlp(hidden: int = 16, seed: int = 3) -> nn.Sequential:
    r = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Linear(6, hidden, dtype=np.float64, rng=r),
        nn.Tanh(),
        nn.Linear(hidden, hidden, dtype=np.float64, rng=r),
        nn.GELU(),
        nn.Linear(hidden, 3, dtype=np.float64, rng=r),
    )


def setup(config: str, hidden: int = 16) -> tuple[nn.Sequential, optim.Optimizer, dict]:
    """The model, optimizer and the ``fit`` options of a configuration: a schedule and clipping
    in each (SGD: momentum, step decay, clipping by norm; AdamW: two parameter groups, linear
    warm-up and decay, clipping by value)."""
    from symgrad.optim import lr_scheduler

    model = mlp(hidden)
    sched: lr_scheduler.LRScheduler
    if config.startswith("sgd"):
        opt: optim.Optimizer = optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        sched = lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
        extra = {"clip_grad_norm": 0.3}
    else:
        body = [p for m in (model[0], model[2]) for p in m.parameters()]
        opt = optim.AdamW(
            [{"params": body}, {"params": model[4].parameters(), "lr": 3e-2}],
            lr=1e-2,
            weight_decay=0.01,
        )
        sched = lr_scheduler.get_linear_schedule_with_warmup(opt, 4, EPOCHS * 6)
        extra = {"clip_grad_value": 0.05}
    options = {"epochs": EPOCHS, "batch_size": BATCH, "seed": 11, "scheduler": sched, **extra}
    return model, opt, options


def one_process(config: str) -> tuple[nn.Sequential, list[float]]:
    """The reference: one process, no process group — ``symgrad.train.fit`` on the same global
    batches, op by op or through the compiled step (which clips inside the step)."""
    from symgrad.train import fit

    model, opt, options = setup(config)
    x, y = data()
    compiled = config.endswith("compiled")
    history = fit(model, nn.CrossEntropyLoss(), opt, x, y, compiled=compiled, **options)
    return model, history.step_losses


MINILM_N, MINILM_BATCH, MINILM_EPOCHS = 13, 4, 3  # 4 steps per epoch, the last of 1 row


def tiny_minilm(seed: int = 5) -> tuple:
    """The MiniLM task's symgrad side (``symgrad.tasks.minilm``) at level b on a tiny random
    encoder (2 layers, 8 wide, the top one trained, float64), its AdamW, 13 messages of 2–10
    tokens and the cached outputs of the frozen bottom layer: ``(ours, opt, data, cached)``."""
    from symgrad.nn.bert import BertConfig
    from symgrad.tasks.minilm import MinilmConfig, _Data, _optimizers, _Ours

    config = BertConfig(vocab_size=10, hidden_size=8, num_attention_heads=2, intermediate_size=16,
                        num_hidden_layers=2, max_position_embeddings=12)  # fmt: skip
    ours = _Ours(np.dtype(np.float64), 1, seed, config=config)
    rng = np.random.default_rng(seed)
    for p in ours.encoder.parameters():
        p.data[...] = rng.normal(scale=0.5, size=p.shape)
    opt, _ = _optimizers(MinilmConfig(level="b", dtype="float64", lr=3e-2), ours, None)
    ours.compile(opt)
    lengths = rng.integers(2, 11, MINILM_N)
    mask = (np.arange(10)[None, :] < lengths[:, None]).astype(np.int64)
    data = _Data(rng.integers(1, 10, (MINILM_N, 10)) * mask, mask, rng.integers(0, 2, MINILM_N))
    return ours, opt, data, ours.cache(data)


def minilm_run(dp: object = None) -> tuple[object, list[float], list[int]]:
    """:func:`tiny_minilm` trained through the task's compiled step, on one process (``dp``
    None: ``_Ours.train_step``) or data-parallel (the task's ``_data_parallel_step``): the
    model's side, every step's loss and correct predictions."""
    from symgrad.tasks.minilm import _correct, _data_parallel_step
    from symgrad.train import batch_order

    ours, opt, data, cached = tiny_minilm()
    if dp is not None:
        dp = dp(ours.model(), opt, MINILM_N, MINILM_BATCH, seed=1)
        dp.reduce_in(ours.compiled)  # type: ignore[attr-defined]
    losses, right = [], []
    for epoch in range(MINILM_EPOCHS):
        for idx in batch_order(MINILM_N, MINILM_BATCH, 1, epoch):
            if dp is None:
                losses.append(ours.train_step(data, cached, idx))
                right.append(_correct(ours.last_logits, data.labels[idx]))
            else:
                value, count = _data_parallel_step(dp, ours, opt, data, cached, idx)
                losses.append(value)
                right.append(count)
    if dp is not None:
        dp.close()  # type: ignore[attr-defined]
    return ours, losses, right


def _tape_step(model: nn.Module, x: np.ndarray, y: np.ndarray, idx: np.ndarray,
               weight: float) -> float:  # fmt: skip
    """Forward and backward of rows ``idx`` on a tape, the loss cotangent scaled by weight."""
    from symgrad.nn import Tape

    tape = Tape()
    out = model.record(tape, x[idx])
    value, grad = nn.CrossEntropyLoss().value_and_grad(out, y[idx])
    tape.backward(out, grad * weight)
    return value


def _save(out: Path, name: str, model: nn.Module, losses: list[float], rank: int) -> None:
    arrays = {f"p/{k}": v for k, v in model.state_dict().items()}
    arrays["losses"] = np.asarray(losses)
    np.savez(out / f"{name}.rank{rank}.npz", **arrays)  # type: ignore[arg-type]


def _record_error(out: Path, name: str, rank: int, err: BaseException) -> None:
    (out / f"{name}.rank{rank}.json").write_text(
        json.dumps({"type": type(err).__name__, "message": str(err)})
    )


def main() -> None:
    import symgrad.distributed as sd
    from symgrad.train import clip_gradients

    scenario, out = sys.argv[1], Path(sys.argv[2])
    timeout = float(os.environ.get("SYMGRAD_TEST_TIMEOUT", "60"))
    world = sd.init(timeout=timeout)
    rank = world.rank
    x, y = data()
    if scenario in ("equivalence", "three"):  # "three": the equivalence runs, on 3 ranks
        for config in CONFIGS:
            model, opt, options = setup(config)
            history = sd.fit(model, nn.CrossEntropyLoss(), opt, x, y, bucket_bytes=700,
                             compiled=config.endswith("compiled"), **options)  # fmt: skip
            _save(out, config, model, history.step_losses, rank)
        # the MiniLM task's data-parallel step (symgrad finetune --task sms-minilm --nproc N)
        ours, losses, right = minilm_run(sd.DataParallel)
        _save(out, "minilm", ours.model(), losses, rank)  # type: ignore[attr-defined]
        np.save(out / f"minilm-right.rank{rank}.npy", np.asarray(right))
    if scenario == "equivalence":
        # DataParallel by hand, on the tape: small buckets, sent during the backward pass
        model, opt, options = setup("sgd-eager")
        # buckets of ≥ 300 bytes: [b4, W4], [b2, W2], [b0, W0]
        dp = sd.DataParallel(model, opt, N, BATCH, seed=options["seed"], bucket_bytes=300)
        losses = []
        for epoch in range(EPOCHS):
            for shard in dp.shards(epoch):
                losses.append(dp.backward(shard, partial(_tape_step, model, x, y)))
                clip_gradients(opt, options["clip_grad_norm"], None)
                opt.step()
                options["scheduler"].step()
        # after the first step (which learns when each gradient is complete) every bucket
        # leaves from the backward pass's hooks, the last layer's before the first's are computed
        stats = dp.reducer.stats
        assert len(dp.reducer.buckets) == 3 and stats.early == 3 * (stats.steps - 1), stats
        _save(out, "tape", model, losses, rank)
        dp.close()
    if scenario in ("equivalence", "three"):
        # interrupted after 2 epochs: the checkpoint another world size resumes from
        model, opt, options = setup("adamw-eager")
        sd.fit(model, nn.CrossEntropyLoss(), opt, x, y, checkpoint=out / "half.npz",
               stop_after_epoch=2, compiled=False, **options)  # fmt: skip
    if scenario in ("equivalence", "three", "resume") and len(sys.argv) > 3:
        # resume a checkpoint written by another number of ranks
        model, opt, options = setup("adamw-eager")
        history = sd.fit(model, nn.CrossEntropyLoss(), opt, x, y, resume=True,
                         checkpoint=Path(sys.argv[3]), compiled=False, **options)  # fmt: skip
        _save(out, "resumed", model, history.step_losses, rank)
    if scenario == "equivalence":
        # a different model on the last rank, then a different symgrad version: refused
        for name in ("structure", "version"):
            other = name == "structure" and rank == world.world_size - 1
            model, opt, options = setup("sgd-eager", hidden=17 if other else 16)
            if name == "version" and rank == world.world_size - 1:
                sd.group.__version__ = "0.0.0-other"  # type: ignore[attr-defined]
            try:
                sd.fit(model, nn.CrossEntropyLoss(), opt, x, y, compiled=False, **options)
            except sd.RankMismatchError as err:
                _record_error(out, name, rank, err)
    elif scenario in ("killed", "hung"):
        model, opt, options = setup("sgd-eager")
        steps = [0]
        loss = nn.CrossEntropyLoss()

        def evaluate(m: nn.Module) -> dict[str, float]:
            return {"epoch_done": 1.0}

        if rank == 1:  # dies (or hangs) in the middle of the third epoch
            original = opt.step

            def step(*args, **kwargs):  # type: ignore[no-untyped-def]
                steps[0] += 1
                if steps[0] == 15:
                    (out / "lost.json").write_text(json.dumps({"time": time.time()}))
                    if scenario == "killed":
                        os._exit(17)
                    time.sleep(3600)
                return original(*args, **kwargs)

            opt.step = step  # type: ignore[method-assign]
        started = time.perf_counter()
        try:
            sd.fit(model, loss, opt, x, y, checkpoint=out / "ckpt.npz", evaluate=evaluate,
                   compiled=False, **options)  # fmt: skip
        except sd.CollectiveError as err:
            (out / f"error.rank{rank}.json").write_text(json.dumps({
                "type": type(err).__name__, "message": str(err),
                "seconds": time.perf_counter() - started, "time": time.time(),
            }))  # fmt: skip
            sd.abort(3)
    sd.shutdown()


if __name__ == "__main__":
    main()
