"""The GPT-2-style block (symgrad.nn.GPTBlock) trained through the compiled step: the same
losses and parameters as the tape's reverse mode (float64, 1e-12) and as nanoGPT's ``Block`` in
torch float64 (autograd, torch.optim.AdamW)."""

from __future__ import annotations

import numpy as np
import pytest

from symgrad import nn, optim
from symgrad.compile import compile_step
from symgrad.errors import DTypeError, ShapeError
from symgrad.nn import GPTBlock, Tape

torch = pytest.importorskip("torch")

N, HEADS, B, T = 8, 2, 2, 5
STEPS, LR = 3, 1e-2


def _block(seed: int = 0) -> GPTBlock:
    """A float64 block whose every parameter is non-trivial (GPT-2's zero biases and unit
    layer norms would hide a wrong gradient of a bias or a norm's weight)."""
    rng = np.random.default_rng(seed)
    block = GPTBlock(N, HEADS, dtype=np.float64, rng=rng)
    for name, p in block.named_parameters():
        small = name.endswith("bias") or name.startswith("ln_")
        p.data = (0.1 if small else 1 / np.sqrt(N)) * rng.normal(size=p.shape)
        if name.startswith("ln_") and name.endswith("weight"):
            p.data += 1.0
    return block


def _batches() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [(rng.normal(size=(B, T, N)), rng.normal(size=(B, T, N))) for _ in range(STEPS)]


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def _tape_steps(block: GPTBlock) -> list[float]:
    opt, mse = optim.AdamW(block.parameters(), lr=LR), nn.MSELoss()
    losses = []
    for x, y in _batches():
        opt.zero_grad()
        tape = Tape()
        out = block.record(tape, x)
        value, grad = mse.value_and_grad(out, y)
        tape.backward(out, grad)
        opt.step()
        losses.append(value)
    return losses


def _torch_steps(block: GPTBlock) -> tuple[list[float], dict[str, np.ndarray]]:
    from symgrad.torch.gpt import GPTBlockTwin

    twin = GPTBlockTwin(N, HEADS, dtype=torch.float64)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in block.torch_state_dict().items()})
    opt = torch.optim.AdamW(twin.parameters(), lr=LR, weight_decay=1e-2)
    losses = []
    for x, y in _batches():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(twin(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().numpy() for k, v in twin.state_dict().items()}


def test_compiled_gpt_block_equals_the_tape_and_torch():
    compiled, taped, start = _block(), _block(), _block()
    step = compile_step(
        compiled, nn.MSELoss(), optim.AdamW(compiled.parameters(), lr=LR, weight_decay=1e-2)
    )
    got = [step(x, y) for x, y in _batches()]
    graph = next(iter(step._bindings.values())).graph
    assert "causal_softmax" in [node.op.name for node in graph.nodes]
    want = _tape_steps(taped)
    assert got == pytest.approx(want, rel=1e-12)
    for (name, a), (_, b) in zip(
        compiled.named_parameters(), taped.named_parameters(), strict=True
    ):
        assert _rel(a.data, b.data) <= 1e-12, name
        assert np.any(a.data != start.state_dict()[name]), f"{name} did not train"
    twin_losses, twin_params = _torch_steps(start)
    assert got == pytest.approx(twin_losses, rel=1e-12)
    mine = compiled.torch_state_dict()
    # The key bias's gradient is exactly 0 (every score of a query's row moves by the same
    # q·c_k, which a softmax ignores): both sides compute rounding noise, which AdamW divides
    # by its own root mean square — an update of ±lr of no meaning.  It is compared on its own.
    key = slice(N, 2 * N)
    bias, twin_bias = mine.pop("attn.c_attn.bias"), twin_params.pop("attn.c_attn.bias")
    first = start.torch_state_dict()["attn.c_attn.bias"]
    for part in (slice(0, N), slice(2 * N, 3 * N)):
        assert _rel(bias[part], twin_bias[part]) <= 1e-11
    assert np.max(np.abs(bias[key] - first[key])) <= 1.01 * LR * STEPS
    assert np.max(np.abs(twin_bias[key] - first[key])) <= 1.01 * LR * STEPS
    for name, value in mine.items():
        assert _rel(value, twin_params[name]) <= 1e-11, name


def test_torch_weights_round_trip_and_bad_inputs_are_named():
    block = _block()
    other = GPTBlock(N, HEADS, dtype=np.float64)
    other.load_torch(block.torch_state_dict())
    for (name, a), (_, b) in zip(block.named_parameters(), other.named_parameters(), strict=True):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)
    state = block.torch_state_dict()
    state["attn.c_attn.weight"] = state["attn.c_attn.weight"][:, :4]
    with pytest.raises(nn.StateDictError, match=r"attn.c_attn.weight.*\(24, 4\).*\(24, 8\)"):
        other.load_torch(state)
    with pytest.raises(ShapeError, match="multiple of num_heads"):
        GPTBlock(10, 3)
    tape = Tape()
    with pytest.raises(ShapeError, match=r"\(batch, tokens, 8\), got \(2, 8\)"):
        block.record(tape, np.zeros((2, N)))
    with pytest.raises(DTypeError, match="float64 weights but x is float32"):
        block.record(tape, np.zeros((2, 3, N), np.float32))


def test_causal_softmax_computes_each_rows_reductions_once():
    """No reduction of the causal softmax's kernels reads the output's key index (``t`` in the
    forward, ``k2`` in the VJPs): a row's max and sum are the row's, hoisted out of the key
    loop, as the symbolic forward has them (``Σ_{u ≤ s}``, no ``t``)."""
    import symgrad as sg

    fills = [
        line
        for line in sg.builtin("causal_softmax").source.splitlines()
        if "_buf[" in line and " = " in line
    ]
    assert fills
    assert not [line for line in fills if "s_t)" in line or "s_k2_X)" in line]
