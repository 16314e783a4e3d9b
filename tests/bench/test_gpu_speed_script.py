"""``benchmarks/gpu_speed.py --smoke --device cpu``: the script's logic end to end on a CPU.

Runs the script in a subprocess at tiny shapes and checks its outputs: exit status 0, the
JSON and markdown files, timed rows for the eager path and both AdamW baselines, and a
correctness section that compared the CPU pure step against the eager path and (where the
kernel builds) the fused CPU kernel, the one real cross-check on a CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_speed.py"


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_smoke_run_on_cpu_writes_results(tmp_path):
    out = tmp_path / "results"
    # compiled is left out: on a CPU inductor compiles it for tens of seconds (it has tests
    # of its own, and the GPU run checks it); triton is asked for and reports unavailable.
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--paths", "eager,triton"]
    cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "== (a) correctness" in proc.stdout and "== (b) speed" in proc.stdout

    data = json.loads((out / "gpu_speed.json").read_text())
    markdown = (out / "gpu_speed.md").read_text()
    assert data["exit_code"] == 0 and data["environment"]["torch"]
    assert "## (a) Correctness" in markdown
    assert "| path | median ms | x fused AdamW | target | met? | peak scratch MiB" in markdown

    # (a): every path ran the 12 steps against the CPU pure step, or said why it could not.
    check = data["check"]
    assert check["reference"] == "cpu_pure" and check["steps"] == 12 and check["passed"]
    paths = {p["path"]: p for p in check["paths"]}
    assert set(paths) == {"eager", "triton", "cpu_fused"}
    assert paths["eager"]["status"] == "pass" and paths["eager"]["steps"] == 12
    assert paths["eager"]["max_ulp"] == 0  # the same pure step on the same device
    fused = paths["cpu_fused"]
    assert fused["status"] in ("pass", "unavailable"), fused
    if fused["status"] == "pass":
        assert fused["steps"] == 12 and fused["max_ulp"] <= check["max_ulp_allowed"]
    assert paths["triton"]["status"] in ("pass", "unavailable"), paths["triton"]
    assert paths["triton"]["status"] == "pass" or paths["triton"]["detail"]

    # (b): every case has both baselines timed; the eager path is timed at the 100M case.
    cases = {c["key"]: c for c in data["cases"]}
    assert set(cases) == {"opt-1.3b", "llama-7b", "single-100m"}
    for case in cases.values():
        rows = {(r["optimizer"], r["path"]): r for r in case["rows"]}
        for label in ("fused", "foreach"):
            r = rows[("AdamW", label)]
            assert r["status"] == "ok" and _finite(r["median_ms"]) and _finite(r["ratio"]), r
            assert r["timed_steps"] >= 20 and r["state_bytes_per_param"] >= 4
        assert rows[("AdamW", "fused")]["ratio"] == 1.0
        micro = {path: r for (optimizer, path), r in rows.items() if optimizer == "MicroAdam"}
        assert set(micro) == ({"eager"} if case["key"] == "single-100m" else {"triton"})
        for r in micro.values():
            assert r["status"] in ("ok", "unavailable"), r
            assert r["status"] == "ok" or r["reason"]
    eager = {(r["optimizer"], r["path"]): r for r in cases["single-100m"]["rows"]}
    eager = eager[("MicroAdam", "eager")]
    assert eager["status"] == "ok" and eager["timed_steps"] == 20
    assert _finite(eager["median_ms"]) and _finite(eager["ratio"]) and eager["target"] == 15.0
    assert all(math.isfinite(t) for t in eager["times_ms"])
    assert 0.5 < eager["state_bytes_per_param"] < 1.5
    assert "MicroAdam eager" in markdown


def _script():
    """The script as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("gpu_speed_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_model_shapes_match_the_published_parameter_counts():
    cases = {c.key: c for c in _script().build_cases(smoke=False, skip_7b=False)}
    assert cases["opt-1.3b"].numel == 1_315_758_080  # facebook/opt-1.3b
    assert cases["llama-7b"].numel == 6_738_415_616  # meta-llama/Llama-2-7b-hf
    assert cases["single-100m"].numel >= 100_000_000


def test_check_gradients_have_no_top_k_ties():
    gs = _script()
    gen = torch.Generator().manual_seed(0)
    for dtype, block, numel in ((torch.float32, 4096, 10_000), (torch.bfloat16, 512, 1300)):
        g = gs.distinct_magnitudes(numel, block, dtype, gen)
        assert g.dtype == dtype and g.shape == (numel,) and bool((g != 0).all())
        for start in range(0, numel, block):
            mags = g[start : start + block].abs()
            assert mags.unique().numel() == mags.numel()
    # Ties made on purpose at the Top-K boundary (k = 6 of 512) are nudged away.
    g = gs.distinct_magnitudes(1024, 512, torch.bfloat16, gen).abs() * 2.0**-8
    g[:7] = 1.0
    group = dict(topk_block_size=512, density=0.01, error_feedback=True)
    assert gs.untie_(g, {}, group) > 0
    layout = gs.topk_layout(1024, 512, 0.01)
    assert not gs.boundary_ties(g.float().abs(), layout).any()


def test_ulp_distance():
    gs = _script()
    x = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.bfloat16)
    y = x.clone()
    assert gs.ulp_distance(x, y) == 0
    y[0] = (x[0].view(torch.int16) + 1).view(torch.bfloat16)
    assert gs.ulp_distance(x, y) == 1
    zeros = torch.tensor([0.0, -0.0])
    assert gs.ulp_distance(zeros, zeros.flip(0)) == 0
    tiny = torch.tensor([1e-45])
    assert gs.ulp_distance(tiny, -tiny) == 2
    assert gs.ulp_distance(torch.tensor([float("nan")]), torch.tensor([1.0])) == math.inf
