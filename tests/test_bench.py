"""``symgrad bench``: the rows it reports, and that its baselines compute the same step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from symgrad import bench, nn, optim
from symgrad.compile import compile_step


def test_a_tiny_run_reports_every_system_with_ratios_to_torch(tmp_path, torch_state) -> None:
    result = bench.run(w1_sizes=[(4, 8)], w2_size=1000, w3=False, with_compile=False)
    rows = result["rows"]
    w1 = {r["system"]: r for r in rows if r["workload"] == "W1 train step"}
    w2 = {r["system"]: r for r in rows if r["workload"] == "W2 sigmoid+BCE"}
    assert {"symgrad compiled", "symgrad layers", "torch eager", "numpy by hand"} <= set(w1)
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
    bench.write_json(result, tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == rows
    report = bench.format_markdown(result, "symgrad bench --quick")
    assert "`symgrad bench --quick`" in report
    assert report.count("\n| W1 train step | B=4 H=8 |") == len(w1)


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
