"""benchmarks.cache_frontier end to end on a tiny digits-shaped model: the table, JSON, plot and re-rendering."""

from __future__ import annotations

import json

import pytest

from benchmarks.cache_frontier import main
from dit_fast.checkpoints import save_checkpoint
from tests.helpers import tiny_dit

pytest.importorskip("sklearn", reason="the digits scorer needs scikit-learn")


def test_frontier_writes_table_json_and_rerenders(tmp_path):
    save_checkpoint(tiny_dit(), tmp_path / "tiny")
    out = tmp_path / "frontier"
    assert main(["--ckpt", str(tmp_path / "tiny"), "--samples", "20", "--samplers", "ddim-6", "--policies", "fora:2",
                 "adaptive:0.1", "auto", "--min-time", "0", "--out", str(out)]) == 0
    run = json.loads(out.with_suffix(".json").read_text())
    rows = run["rows"]
    assert [(r["sampler"], r["cfg_scale"], r["policy"]) for r in rows] == [
        ("ddim-6", c, p) for c in (1.0, 2.0) for p in ("none", "fora:2", "adaptive:0.1:4", "adaptive:0.15:4")]
    assert [r["full_evals"] for r in rows[:2]] == [6, 3]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| ddim-6 | 2 | fora:2 | 3 / 6 |" in table
    assert "| **adaptive:0.15:4 (auto)** |" in table  # "auto" below 50 steps
    assert "**adaptive:0.1:4" not in table
    out.with_suffix(".md").unlink()
    assert main(["--render", str(out.with_suffix(".json"))]) == 0
    assert out.with_suffix(".md").read_text() == table
    with pytest.raises(SystemExit):
        main(["--ckpt", str(tmp_path / "tiny"), "--samplers", "euler-5"])


def test_frontier_through_a_diffusers_pipeline(tmp_path):
    pytest.importorskip("diffusers", reason="--pipeline samples through diffusers' DiTPipeline")
    save_checkpoint(tiny_dit(), tmp_path / "tiny")
    out = tmp_path / "frontier"
    assert main(["--ckpt", str(tmp_path / "tiny"), "--pipeline", "--samples", "10", "--samplers", "dpm++-4",
                 "--policies", "fora:2", "--min-time", "0", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["cfg_scale"], r["policy"], r["full_evals"], r["cached_steps"]) for r in rows] == [
        (1.0, "none", 4, 0), (1.0, "fora:2", 2, 2)]  # unguided only: DiTPipeline's null class is 1000
    assert "DiTPipeline" in out.with_suffix(".md").read_text()
