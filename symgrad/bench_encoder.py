"""W4 of ``symgrad bench``: one MiniLM-size BERT encoder layer's training step, float32.

The layer of all-MiniLM-L6-v2 (hidden 384, 12 heads of 32, FFN 1536, exact GELU, post-norm) on
a batch of ``B`` sequences of ``T`` tokens with a padding mask (each sequence ``T/2`` to ``T``
tokens long); one step is the forward, the mean squared error against a fixed target, the
backward pass (every parameter's gradient) and an AdamW update (lr 1e-4):

* **symgrad compiled** — :func:`symgrad.compile.compile_step` of :class:`symgrad.nn.BertLayer`:
  the whole step one generated function;
* **symgrad tape** — the layer recorded on a :class:`symgrad.nn.Tape`, the backward pass the
  tape composing the ops' derived VJPs, then ``optimizer.step()``;
* **torch eager** — Hugging Face's ``BertLayer`` (transformers' default ``sdpa`` attention,
  its fastest on the CPU) with the same weights, ``torch.optim.AdamW``; **torch eager
  (eager attn)** the same with ``attn_implementation="eager"`` (softmax(QKᵀ/√d + mask)·V in
  torch ops: the formula symgrad derives);
* **torch.compile** — ``torch.compile`` of the layer (forward and its backward), the same
  optimizer;
* **jax jit** — the layer written in ``jax.numpy``, ``jax.jit`` of the whole step (value and
  gradient, AdamW written out) when JAX is installed.

:func:`parts` times the layer's parts in isolation — its six linear layers, the two attention
products, the masked softmax, GELU and the two residual layer norms, each forward + VJP — for
symgrad (each op on its own tape) and torch (the same ops in eager torch), so a ratio per part
shows where the time goes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

HIDDEN, HEADS, FFN = 384, 12, 1536
LR = 1e-4


def _config() -> Any:
    from .nn.bert import BertConfig

    return BertConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        num_hidden_layers=1,
        vocab_size=8,
        max_position_embeddings=8,
    )


def _data(batch: int, seq: int) -> dict[str, Any]:
    """Weights (Hugging Face names and shapes), inputs, mask and cotangent, seeded."""
    rng = np.random.default_rng(0)
    n, i = HIDDEN, FFN
    shapes = {
        "attention.self.query.weight": (n, n),
        "attention.self.query.bias": (n,),
        "attention.self.key.weight": (n, n),
        "attention.self.key.bias": (n,),
        "attention.self.value.weight": (n, n),
        "attention.self.value.bias": (n,),
        "attention.output.dense.weight": (n, n),
        "attention.output.dense.bias": (n,),
        "attention.output.LayerNorm.weight": (n,),
        "attention.output.LayerNorm.bias": (n,),
        "intermediate.dense.weight": (i, n),
        "intermediate.dense.bias": (i,),
        "output.dense.weight": (n, i),
        "output.dense.bias": (n,),
        "output.LayerNorm.weight": (n,),
        "output.LayerNorm.bias": (n,),
    }
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("LayerNorm.weight"):
            weights[name] = 1 + 0.1 * rng.normal(size=shape)
        elif len(shape) == 2:
            weights[name] = rng.normal(size=shape) / np.sqrt(shape[1])
        else:
            weights[name] = 0.1 * rng.normal(size=shape)
    lengths = rng.integers(seq // 2, seq + 1, batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.float32)
    f32 = {k: v.astype(np.float32) for k, v in weights.items()}
    return {
        "weights": f32,
        "hidden": rng.normal(size=(batch, seq, n)).astype(np.float32),
        "mask": mask,
        "target": rng.normal(size=(batch, seq, n)).astype(np.float32),
    }


def _symgrad_layer(data: dict[str, Any]) -> Any:
    from .nn.bert import BertLayer

    layer = BertLayer(_config(), np.dtype(np.float32))
    params = dict(layer.named_parameters())
    for name, value in data["weights"].items():
        params[name].data = np.ascontiguousarray(value.reshape(params[name].shape))
    return layer


def _symgrad_steps(data: dict[str, Any]) -> dict[str, Callable[[], object]]:
    from . import nn, optim
    from .compile import compile_step
    from .nn import Tape

    hidden, mask, target = data["hidden"], data["mask"], data["target"]
    layer = _symgrad_layer(data)
    compiled = compile_step(layer, nn.MSELoss(), optim.AdamW(layer.parameters(), lr=LR))
    taped = _symgrad_layer(data)
    opt, mse = optim.AdamW(taped.parameters(), lr=LR), nn.MSELoss()

    def tape_step() -> None:
        opt.zero_grad()
        tape = Tape()
        out = taped.record(tape, hidden, mask)
        _, grad = mse.value_and_grad(out, target)
        tape.backward(out, grad)
        opt.step()

    return {
        "symgrad compiled": lambda: compiled(hidden, mask, target),
        "symgrad tape": tape_step,
    }


def _torch_layer(data: dict[str, Any], attn: str) -> tuple[Any, Callable[[], object]]:
    import torch
    import transformers
    from transformers.models.bert.modeling_bert import BertLayer

    config: Any = transformers.BertConfig(  # type: ignore[call-arg]  # kwargs pass through
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12,
        attn_implementation=attn,
    )
    layer = BertLayer(config).eval()
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in data["weights"].items()})
    return layer, _torch_step(layer, layer, data)


def _torch_step(layer: Any, run: Any, data: dict[str, Any]) -> Callable[[], object]:
    """A training step of ``layer`` whose forward is ``run`` (the layer, or its compiled
    form)."""
    import torch

    hidden = torch.from_numpy(data["hidden"])
    mask = torch.from_numpy(data["mask"])
    extended = ((1.0 - mask) * torch.finfo(torch.float32).min)[:, None, None, :]
    target = torch.from_numpy(data["target"])
    opt = torch.optim.AdamW(layer.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = run(hidden, extended)
        out = out[0] if isinstance(out, tuple) else out
        torch.nn.functional.mse_loss(out, target).backward()
        opt.step()

    return step


def _torch_compiled(data: dict[str, Any]) -> Callable[[], object] | None:
    import torch

    layer, _ = _torch_layer(data, "sdpa")
    try:
        step = _torch_step(layer, torch.compile(layer), data)
        step()
    except Exception:  # a peer that cannot compile here is left out of the table, not fatal
        return None
    return step


def _jax_layer(data: dict[str, Any]) -> Callable[[], object] | None:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    hidden, target = jnp.asarray(data["hidden"]), jnp.asarray(data["target"])
    add_mask = jnp.asarray((1.0 - data["mask"]) * np.finfo(np.float32).min)[:, None, None, :]
    m = HIDDEN // HEADS

    def norm(x: Any, g: Any, b: Any) -> Any:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-12) * g + b

    def layer(w: Any, x: Any) -> Any:
        def dense(x: Any, name: str) -> Any:
            return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

        def heads(x: Any) -> Any:
            b, t, _ = x.shape
            return x.reshape(b, t, HEADS, m).transpose(0, 2, 1, 3)

        q, k, v = (heads(dense(x, f"attention.self.{p}")) for p in ("query", "key", "value"))
        p = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(m) + add_mask, axis=-1)
        ctx = (p @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        a = norm(
            dense(ctx, "attention.output.dense") + x,
            w["attention.output.LayerNorm.weight"],
            w["attention.output.LayerNorm.bias"],
        )
        inner = jax.nn.gelu(dense(a, "intermediate.dense"), approximate=False)
        return norm(
            dense(inner, "output.dense") + a,
            w["output.LayerNorm.weight"],
            w["output.LayerNorm.bias"],
        )

    def loss(w: Any) -> Any:
        return jnp.mean((layer(w, hidden) - target) ** 2)

    b1, b2, eps, wd = 0.9, 0.999, 1e-8, 1e-2

    @jax.jit
    def step(w: Any, m1: Any, m2: Any, t: Any) -> Any:
        grads = jax.grad(loss)(w)
        t = t + 1
        new_w, new_m1, new_m2 = {}, {}, {}
        for name, g in grads.items():
            p = w[name] * (1 - LR * wd)
            new_m1[name] = b1 * m1[name] + (1 - b1) * g
            new_m2[name] = b2 * m2[name] + (1 - b2) * g * g
            hat1 = new_m1[name] / (1 - b1**t)
            hat2 = new_m2[name] / (1 - b2**t)
            new_w[name] = p - LR * hat1 / (jnp.sqrt(hat2) + eps)
        return new_w, new_m1, new_m2, t

    weights = {k: jnp.asarray(v) for k, v in data["weights"].items()}
    zeros = {k: jnp.zeros_like(v) for k, v in weights.items()}
    state = {"all": (weights, zeros, dict(zeros), jnp.asarray(0.0))}

    def run() -> None:
        state["all"] = step(*state["all"])
        jax.block_until_ready(state["all"][0])

    return run


def candidates(batch: int, seq: int, with_compile: bool) -> dict[str, Callable[[], object]]:
    """The W4 systems, each a callable running one training step."""
    data = _data(batch, seq)
    found: dict[str, Callable[[], object]] = {
        **_symgrad_steps(data),
        "torch eager": _torch_layer(data, "sdpa")[1],
        "torch eager (eager attn)": _torch_layer(data, "eager")[1],
    }
    if with_compile:
        compiled = _torch_compiled(data)
        if compiled is not None:
            found["torch.compile"] = compiled
    jax_step = _jax_layer(data)
    if jax_step is not None:
        found["jax jit"] = jax_step
    return found


# -- the parts -----------------------------------------------------------------------------


def _symgrad_parts(data: dict[str, Any]) -> dict[str, Callable[[], object]]:
    from .nn import Parameter, Tape
    from .nn.bert import _ops, additive_mask

    rng = np.random.default_rng(1)
    b, t = data["hidden"].shape[:2]
    n, h, m, i = HIDDEN, HEADS, HIDDEN // HEADS, FFN
    op = _ops(1e-12)

    def arr(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32)

    def run(name: str, *args: Any) -> Callable[[], object]:
        arrays = [a for a in args if isinstance(a, np.ndarray)]

        def once() -> None:
            for a in args:
                if isinstance(a, Parameter):
                    a.grad = None
            tape = Tape()
            tape.watch(*arrays)
            out = tape.apply(op[name], *args)
            tape.backward(out, np.ones_like(out), wrt=tuple(arrays))

        return once

    def param(*shape: int) -> Parameter:
        return Parameter(arr(*shape))

    x, inner = arr(b, t, n), arr(b, t, i)
    lin = [
        *[run("head_projection", x, param(h, m, n), param(h, m)) for _ in range(3)],
        run("head_merge", arr(b, t, h, m), param(n, h, m), param(n)),
        run("seq_linear", x, param(i, n), param(i)),
        run("seq_linear", inner, param(n, i), param(n)),
    ]
    att = [
        run("attention_scores", arr(b, t, h, m), arr(b, t, h, m)),
        run("attention_context", arr(b, h, t, t), arr(b, t, h, m)),
    ]
    mask = additive_mask(data["mask"], np.dtype(np.float32))
    scores = arr(b, h, t, t)
    softmax = run("masked_softmax", scores, mask)
    gelu = run("gelu", arr(b, t, i))
    norms = [run("add_layer_norm", arr(b, t, n), arr(b, t, n), param(n), param(n)) for _ in "ab"]
    return {
        "6 linear layers": lambda: [f() for f in lin],
        "attention products": lambda: [f() for f in att],
        "masked softmax": softmax,
        "GELU": gelu,
        "2 residual layer norms": lambda: [f() for f in norms],
    }


def _torch_parts(data: dict[str, Any]) -> dict[str, Callable[[], object]]:
    import torch
    import torch.nn.functional as functional

    gen = torch.Generator().manual_seed(1)
    b, t = data["hidden"].shape[:2]
    n, h, m, i = HIDDEN, HEADS, HIDDEN // HEADS, FFN

    def arr(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen).requires_grad_(True)

    def run(fn: Callable[..., Any], *args: Any) -> Callable[[], object]:
        def once() -> None:
            for a in args:
                a.grad = None
            out = fn(*args)
            out.backward(torch.ones_like(out))

        return once

    x, inner = arr(b, t, n), arr(b, t, i)
    lin = [run(functional.linear, x, arr(n, n), arr(n)) for _ in range(4)]
    lin += [
        run(functional.linear, x, arr(i, n), arr(i)),
        run(functional.linear, inner, arr(n, i), arr(n)),
    ]
    att = [
        run(lambda q, k: q @ k.transpose(-1, -2) / m**0.5, arr(b, h, t, m), arr(b, h, t, m)),
        run(lambda p, v: p @ v, arr(b, h, t, t), arr(b, h, t, m)),
    ]
    mask = torch.from_numpy(data["mask"])
    extended = ((1.0 - mask) * torch.finfo(torch.float32).min)[:, None, None, :]
    softmax = run(lambda s: torch.softmax(s + extended, -1), arr(b, h, t, t))
    gelu = run(functional.gelu, arr(b, t, i))
    norms = [
        run(
            lambda a, r, w, c: functional.layer_norm(a + r, (n,), w, c, 1e-12),
            arr(b, t, n),
            arr(b, t, n),
            arr(n),
            arr(n),
        )
        for _ in "ab"
    ]
    return {
        "6 linear layers": lambda: [f() for f in lin],
        "attention products": lambda: [f() for f in att],
        "masked softmax": softmax,
        "GELU": gelu,
        "2 residual layer norms": lambda: [f() for f in norms],
    }


def parts(batch: int, seq: int) -> dict[str, dict[str, Callable[[], object]]]:
    """Part name → {"symgrad": fn, "torch eager": fn}: each part's forward + VJP alone."""
    data = _data(batch, seq)
    ours, theirs = _symgrad_parts(data), _torch_parts(data)
    return {name: {"symgrad": ours[name], "torch eager": theirs[name]} for name in ours}
