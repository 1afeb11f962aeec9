"""``symgrad bench``: the rows it reports, and that its baselines compute the same step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from symgrad import bench, nn, optim
from symgrad.compile import compile_step
from symgrad.runtime import blas


def test_a_tiny_run_reports_every_system_with_ratios_to_torch(tmp_path, torch_state) -> None:
    result = bench.run(
        w1_sizes=[(4, 8)], w2_size=1000, w3=False, with_compile=False, workloads=("W1", "W2")
    )
    rows = result["rows"]
    w1 = {r["system"]: r for r in rows if r["workload"] == "W1 train step"}
    w2 = {r["system"]: r for r in rows if r["workload"] == "W2 sigmoid+BCE"}
    assert {"symgrad compiled", "symgrad fit", "symgrad layers", "torch eager",
            "numpy by hand"} <= set(w1)  # fmt: skip
    assert set(w2) == {"symgrad", "torch eager", "numpy", "bandwidth floor"}
    for table in (w1, w2):
        assert table["torch eager"]["ratio_to_torch"] == 1.0
        for row in table.values():
            assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"]
            ratio = row["median_ms"] / table["torch eager"]["median_ms"]
            assert row["ratio_to_torch"] == pytest.approx(ratio)
    assert result["threads"] == 1 and result["machine"]["cores"] >= 1
    text = bench.format_table(result)
    assert "B=4 H=8" in text and "symgrad compiled" in text and "× torch" in text
    assert f"kernels' BLAS: {blas.KERNEL_BLAS}" in text  # (which kernels the GEMMs ran)
    bench.write_json(result, tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == rows
    report = bench.format_markdown(result, "symgrad bench --quick")
    assert "`symgrad bench --quick`" in report and f"BLAS: {blas.KERNEL_BLAS}." in report
    assert report.count("\n| W1 train step | B=4 H=8 |") == len(w1)


def test_a_candidate_taking_several_steps_a_call_is_timed_per_step() -> None:
    calls = {"one": 0, "epoch": 0}

    def count(name: str):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    found = bench.interleaved(
        {"one": count("one"), "epoch": count("epoch")}, repeats=3, warmup=0, block=8,
        steps={"epoch": 4},
    )  # fmt: skip
    # a turn is 8 steps of each: 8 calls of the one-step candidate, 2 of the 4-step one
    assert calls == {"one": 24, "epoch": 6}
    assert found["epoch"]["repeats"] == found["one"]["repeats"] == 3


def test_settling_calls_start_each_turn_untimed(monkeypatch) -> None:
    calls: list[str] = []
    clock = {"now": 0.0}

    def slow_first(name: str):
        def call() -> None:
            # the first call of a turn is the slow one (the other candidate's threads still
            # spinning): 10 s; the settled ones 1 s
            clock["now"] += 10.0 if not calls or calls[-1] != name else 1.0
            calls.append(name)

        return call

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])
    found = bench.interleaved(
        {"a": slow_first("a"), "b": slow_first("b")}, repeats=2, warmup=0, settle=5.0
    )
    # 5 s of settling: the 10-s call and no more, then the timed one
    assert calls == ["a", "a", "b", "b", "a", "a", "b", "b"]
    assert found["a"]["median_s"] == found["b"]["min_s"] == 1.0


def test_a_tiny_w4_run_reports_the_layer_and_each_part(torch_state) -> None:
    """W4 at B=2, T=8 (the layer keeps MiniLM's size): the whole-layer systems and every part,
    each with its torch row; a run of the workloads named only."""
    result = bench.run(w4_size=(2, 8), w3=False, with_compile=False, workloads=("W4",))
    rows = result["rows"]
    assert {r["workload"].split()[0] for r in rows} == {"W4"}
    assert {r["size"] for r in rows} == {"B=2 T=8"}
    layer = {r["system"] for r in rows if r["workload"] == "W4 BERT layer"}
    assert {"symgrad compiled", "symgrad tape", "torch eager"} <= layer
    parts = {r["workload"] for r in rows} - {"W4 BERT layer"}
    assert len(parts) == 5
    for part in parts:
        systems = {r["system"]: r for r in rows if r["workload"] == part}
        assert set(systems) == {"symgrad", "torch eager"}
        assert systems["torch eager"]["ratio_to_torch"] == 1.0
        assert systems["symgrad"]["median_ms"] > 0


def test_the_numpy_baseline_takes_the_same_step_as_symgrad() -> None:
    """Both W1 candidates do the same work: one SGD step of the same model on the same batch."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 64)), rng.integers(0, 10, 6)
    ours, theirs = bench._mlp(16, np.float64), bench._mlp(16, np.float64)
    step = compile_step(ours, nn.CrossEntropyLoss(), optim.SGD(ours.parameters(), lr=bench.LR))
    numpy_step, w, b = bench._numpy_step(theirs, x, y)
    for _ in range(2):
        step(x, y)
        numpy_step()
    for k, layer in enumerate((0, 2, 4)):
        np.testing.assert_allclose(ours[layer].weight.data, w[k], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ours[layer].bias.data, b[k], rtol=1e-12, atol=1e-14)
