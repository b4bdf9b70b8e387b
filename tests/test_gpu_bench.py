"""benchmarks/gpu.py's record and the README table generated from it (benchmarks/gpu_table.py), on CPU.

The GPU figures themselves need a GPU (`python benchmarks/gpu.py`); these tests check what the CPU can: the
peers' float64 reference, the loss-convention bookkeeping of the accuracy check, the record's schema from a
smoke run, and that every ratio in the table is computed from the record's own rows.
"""

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu  # noqa: E402
import gpu_peers  # noqa: E402
import gpu_table  # noqa: E402


def test_reference_sum_matches_a_loop_over_pairs():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1)
    ys = [F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1) for _ in range(2)]
    log_t, b = torch.tensor(math.log(7.0), dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    total, gx, gys = gpu_peers.reference_sum(x, ys, log_t, b)
    expect = 0.0
    for y in ys:
        for i in range(5):
            for j in range(5):
                z = 1.0 if i == j else -1.0
                expect += math.log1p(math.exp(-z * (7.0 * float(x[i] @ y[j]) - 2.0)))
    assert total == pytest.approx(expect, rel=1e-12)
    assert gx.shape == x.shape and len(gys) == 2


def test_accuracy_compares_each_impl_with_its_own_normalisation():
    """sail averages over B^2 pairs, the peers divide the sum by B: an exact implementation of either convention
    must show ~0 error (bf16 inputs are upcast exactly), a wrong one a large error."""
    def exact(norm):
        def loss(x, y, log_t, b):
            z = 2 * torch.eye(x.shape[0]) - 1
            value = (-F.logsigmoid(z * (log_t.exp() * x.double() @ y.double().T + b))).sum() / norm(x.shape[0])
            return value
        return loss

    impls = {"sail-exact": exact(lambda n: n * n), "peer-exact": exact(lambda n: n), "peer-wrong": exact(lambda n: n * n)}
    out = gpu_peers._accuracy(impls, torch.device("cpu"), 64, 16)
    for name in ("sail-exact", "peer-exact"):
        # t = exp(log t) is rounded to float32 in the impl; gradients of bf16 leaves are bf16 (eps 2^-8)
        assert out[name]["loss_rel"] < 1e-6 and out[name]["dx_rel"] < 4e-3 and out[name]["dy_rel"] < 4e-3
    assert out["peer-wrong"]["loss_rel"] == pytest.approx(1 - 1 / 64, rel=1e-5)
    assert out["peer-wrong"]["dx_rel"] == pytest.approx(1 - 1 / 64, rel=1e-2)


def test_smoke_run_writes_the_record(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    assert gpu.main(["--smoke", "--only", "matmul,peers", "--sizes", "64", "--record", str(path)]) == 0
    record = json.loads(path.read_text())
    assert set(record["stack"]) >= {"device", "torch", "triton", "cuda", "driver", "date"}
    assert record["bf16_peak_tflops"] == record["sections"]["matmul"]["bf16_tflops"] > 0
    rows = record["peers"]
    assert {r["impl"] for r in rows} >= {"sail-torch", "sail"}
    for r in rows:
        assert set(r) >= {"impl", "batch", "dim", "dtype", "seconds", "peak_gib", "share_of_peak"}
        assert r["share_of_peak"] == pytest.approx(r["tflops"] / record["bf16_peak_tflops"])
    assert "sail-triton" in record["peers_missing"]  # said, not silently absent
    assert "record:" in capsys.readouterr().out


def test_a_spent_budget_skips_later_sections_and_the_record_keeps_each_finished_one(tmp_path, monkeypatch):
    """Sections run in ORDER whatever --only says; once --budget is spent the rest are recorded as skipped; the
    record is rewritten after every section (a run killed at the device's time limit keeps what it measured)."""
    path = tmp_path / "gpu.json"
    clock = itertools.count(0, 100)  # every perf_counter() call: 100 s later
    written = []
    real_write = gpu.write_record
    monkeypatch.setattr(gpu.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(gpu, "write_record", lambda p, r: (written.append(dict(r)), real_write(p, r)))
    monkeypatch.setattr(gpu, "SECTIONS", {**gpu.SECTIONS, "loader": lambda ctx: {"pairs_s": 1.0},
                                          "matmul": lambda ctx: {"bf16_tflops": 1.0}})
    assert gpu.main(["--smoke", "--only", "loader,matmul", "--budget", "150", "--record", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["sections"]["matmul"] == {"bf16_tflops": 1.0}  # matmul ran first (ORDER), inside the budget
    assert record["loader"]["skipped"].startswith("time budget: 150 s")
    assert [w["complete"] for w in written] == [False, True]
    assert gpu.main(["--smoke", "--only", "matmul", "--budget", "0"]) == 2


def test_merge_completes_a_record_in_a_second_command(tmp_path):
    path = tmp_path / "gpu.json"
    assert gpu.main(["--smoke", "--only", "matmul,peers", "--sizes", "64", "--record", str(path)]) == 0
    first = json.loads(path.read_text())
    assert gpu.main(["--smoke", "--only", "loader", "--record", str(path), "--merge"]) == 0
    merged = json.loads(path.read_text())
    assert merged["peers"] == first["peers"] and merged["bf16_peak_tflops"] == first["bf16_peak_tflops"]
    assert merged["loader"]["pairs_s"] > 0 and merged["complete"]
    assert gpu.main(["--smoke", "--only", "loader", "--record", str(tmp_path / "none.json"), "--merge"]) == 2
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert gpu.main(["--smoke", "--only", "loader", "--record", str(tmp_path / "bad.json"), "--merge"]) == 2


def test_peers_past_the_deadline_are_recorded_as_skipped(capsys):
    out = gpu_peers.peers(torch.device("cpu"), 1.0, sizes=(64,), dims=(16, 8), repeats=1, check_n=32, deadline=0.0)
    assert out["rows"] and all(r["skipped"].startswith("time budget") and "seconds" not in r for r in out["rows"])
    assert {r["dim"] for r in out["rows"]} == {16, 8} and "time budget" in capsys.readouterr().out
    record = {**_record(), "peers": out["rows"], "complete": False}
    text = gpu_table.render(record)
    assert "skipped" in text and "Incomplete: the run stopped before its last section" in text


def _record():
    peak = 800.0

    def row(impl, batch, seconds, captions=1, dim=1024):
        tflops = 6 * batch * captions * batch * dim / seconds / 1e12
        return {"impl": impl, "batch": batch, "dim": dim, "dtype": "bf16", "captions": captions, "seconds": seconds,
                "peak_gib": 1.0, "tflops": tflops, "share_of_peak": tflops / peak}

    return {"command": "python benchmarks/gpu.py", "seconds": 1.0, "bf16_peak_tflops": peak,
            "stack": {"device": "GPU", "torch": "2.13"},
            "peers": [row("sail-triton", 65536, 0.040), row("siglip-kernel", 65536, 0.060), {
                "impl": "open_clip", "batch": 65536, "dim": 1024, "dtype": "bf16", "captions": 1, "oom": True},
                row("sail", 65536, 0.1, captions=2), row("siglip-kernel-plus", 65536, 0.25, captions=2)],
            "step": {"at_36864": {"B": 36864, "step_s": 0.05, "pairs_s": 737280.0, "peak_gib": 5.0,
                                  "share_of_bf16_peak": 0.5}},
            "loader": {"batch": 36864, "pairs_s": 1474560.0},
            "extraction": {"pipeline_img_s": 2000.0, "pipeline_images": 51200, "pipeline_over_forward": 0.8,
                           "pipeline_cpu_img_s": 1000.0, "pipeline_cpu_over_forward": 0.4, "pipeline_decode": "gpu",
                           "pipeline_gpu_img_s": 2000.0, "pipeline_gpu_over_forward": 0.8, "gpu_vs_cpu_cos_min": 0.999,
                           "gpu_vs_cpu_cos_mean": 0.9999, "gpu_vs_cpu_max_abs_diff": 0.01}}


def test_table_ratios_come_from_the_record():
    text = gpu_table.render(_record())
    line = next(s for s in text.splitlines() if s.startswith("| 1 | 1024 | 65536 |"))
    assert "1.50x" in line  # 0.060 / 0.040, same run
    assert "does not fit" in line
    multi = next(s for s in text.splitlines() if s.startswith("| 2 | 1024 | 65536 |"))
    assert "2.50x" in multi  # SigLIP+ 0.25 s over sail's multi-positive 0.1 s
    assert "2.00x the step of this run" in text  # loader 1474560 / step 737280
    assert "--decode cpu, 51200 JPEG rows | 1000 img/s = 0.4x the forward" in text
    assert "--decode gpu, 51200 JPEG rows | 2000 img/s = 0.8x the forward" in text
    assert "centred cosine min 0.9990" in text


def test_readme_block_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{gpu_table.START}\nold table\n{gpu_table.END}\nafter\n")
    record = tmp_path / "gpu.json"
    record.write_text(json.dumps(_record()))
    assert gpu_table.main([str(record), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\nafter\n") and "old table" not in text
    assert "1.50x" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no .* block"):
        gpu_table.main([str(record), "--readme", str(readme)])
