import json

import pytest

from lsep_tune.bench.__main__ import main, parse_args
from lsep_tune.bench.flops import device_peak, forward_parts, lsep_recompute_share, train_flops_per_image
from lsep_tune.bench.search import last_results, shares
from lsep_tune.bench.train import bench_config
from lsep_tune.config import load_config

TINY = ["train", "--model", "SiT-Tiny/2", "--input-size", "8", "--batch", "4", "--steps", "2", "--warmup", "1",
        "--precision", "fp32", "--set", "objective.lsep.encoder_depth=2", "--set", "objective.sra.block_out_s=1",
        "--set", "objective.sra.block_out_t=3"]


def test_bench_train_prints_one_json_object_per_configuration(capsys):
    assert main(TINY + ["--regularizers", "none", "lsep", "lsep+sra", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["regularizers"] for r in results] == ["none", "lsep", "lsep+sra"]
    for r in results:
        for key in ("images_per_s", "ms_per_step", "peak_mem_bytes", "flops_per_image"):
            assert r[key] > 0, key
        assert r["mfu"] is None  # a CPU has no known peak
        assert r["images_per_s"] == pytest.approx(4 / (r["ms_per_step"] / 1e3), rel=1e-3)
    assert results[0]["flops_per_image"] < results[1]["flops_per_image"] < results[2]["flops_per_image"]


def test_bench_train_baseline_path_runs(capsys):
    assert main(TINY + ["--regularizers", "lsep", "--json"]) == 0
    reuse = json.loads(capsys.readouterr().out)
    assert main(TINY + ["--regularizers", "lsep", "--baseline", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == "baseline" and reuse["path"] == "optimized"
    # Without reuse the whole probe batch is counted again: the reuse path's probe pass covers only the
    # share of samples whose labels differ, the baseline's all of them; the probe head is the same in both.
    cfg = bench_config(parse_args(TINY + ["--regularizers", "lsep"]), ("lsep",))
    share = lsep_recompute_share(cfg)
    head = 3 * 2 * forward_parts(cfg)["hidden"] * cfg.model.num_classes
    base, reused = result["flops_per_image_parts"], reuse["flops_per_image_parts"]
    assert 0 < share < 1
    assert base["flow"] == reused["flow"]
    assert reused["lsep"] - head == pytest.approx(share * (base["lsep"] - head))
    assert base["lsep"] > reused["lsep"] > 0


def test_bench_times_repa_on_synthetic_encoder_tokens(capsys):
    assert main(TINY + ["--regularizers", "lsep+repa", "--set", "objective.repa.encoder_depth=2",
                        "--set", "objective.repa.projector_dim=32", "--set", "objective.repa.encoder_dim=16",
                        "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["regularizers"] == "lsep+repa"
    assert result["flops_per_image_parts"]["repa"] == 3 * 2 * 16 * (64 * 32 + 32 * 32 + 32 * 16)  # 4x4 tokens


@pytest.mark.parametrize("extra, field", [
    (["--regularizers", "nope"], "--regularizers"),
    (["--batch", "0"], "--batch"),
    (["--model", "SiT-Q/2"], "model.name"),
    (["--set", "objective.lsep.encoder_depth=9"], "objective.lsep.encoder_depth"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, extra, field):
    assert main(TINY + extra) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and field in captured.err


def test_flops_match_the_published_sizes():
    # DiT reports 118.6 GFLOPs (multiply-adds) for XL/2 and 23.0 for B/2 at 256px: the same matmuls as SiT.
    for preset, gmacs in (("imagenet256-sit-xl2", 118.6), ("imagenet256-sit-b2", 23.0)):
        cfg = load_config(preset=preset)
        f = forward_parts(cfg)
        forward = f["embed"] + f["depth"] * f["block"] + f["final"]
        assert forward / 2e9 == pytest.approx(gmacs, rel=0.02)
    cfg = load_config(preset="imagenet256-sit-xl2")
    assert lsep_recompute_share(cfg) == pytest.approx(0.82)  # p_u = 0.9, p_c = 0.1: 18% reused
    flops = train_flops_per_image(cfg)
    f = forward_parts(cfg)
    assert flops["lsep"] == pytest.approx(3 * 0.82 * (f["embed"] + 8 * f["block"]) + 3 * 2 * 1152 * 1000)
    assert device_peak("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12 and device_peak("cpu", "bf16") is None


def test_search_shares_from_tune_results(tmp_path):
    for i, (total, train) in enumerate(((100.0, 60.0), (50.0, 40.0))):
        folder = tmp_path / "tune" / f"trial_{i}"
        folder.mkdir(parents=True)
        early = {"time_total_s": total / 2, "time_train_s": 1.0}
        last = {"time_total_s": total, "time_train_s": train, "time_eval_s": 10.0, "time_checkpoint_s": 2.0,
                "time_report_s": 1.0, "time_startup_s": 3.0}
        (folder / "result.json").write_text(json.dumps(early) + "\n" + json.dumps(last) + "\n")
    report = shares(last_results(tmp_path), wall_s=100.0, slots=2)
    assert report["trials"] == 2 and report["slot_time_s"] == 150.0
    assert report["train_share"] == pytest.approx(100 / 150, abs=1e-4)
    assert report["startup_outside_loop_s"] == pytest.approx(150 - 100 - 20 - 4 - 2 - 6)
    assert report["train_share_without_outside_startup"] == pytest.approx(100 / 132, abs=1e-4)
    assert report["train_share_of_capacity"] == pytest.approx(0.5)


@pytest.mark.slow
def test_compare_prints_both_ratios(capsys):
    assert main(TINY + ["--compare", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ray_line = next(line for line in lines if line.startswith("ray_over_inprocess="))
    lsep_line = next(line for line in lines if line.startswith("lsep_over_flow="))
    assert float(ray_line.split("=")[1].split()[0]) > 0
    assert float(lsep_line.split("=")[1].split()[0]) > 0 and "analytic=" in lsep_line
