"""Tests of spanet-bench: the CLI, the JSON's shape and values, the helpers. Speed is never asserted.

One tiny run of every level (module-scoped fixture) feeds most tests; sizes,
batches and repeats are the smallest the flags allow.
"""
import json
import math
import runpy
import struct
import sys

import pytest
import torch

import spanet_ops
from spanet.bench import cli, measure, report, sweep
from spanet.bench.operators import parse_shapes
from spanet_ops import plans

#: docs/spec.md §3 and timm: trainable parameters of the models in the tiny run.
KNOWN_PARAMS = {"spanet_small": 28_605_096, "spanet_small:reference": 28_605_096, "convnext_tiny": 28_589_128}

TINY = [
    "--levels", "ops,module,model,sweep",
    "--threads", "1",
    "--shapes", "6:8:1,9:5:2",
    "--batch", "1",
    "--dtypes", "fp32,bf16",
    "--modes", "fwd,fwd+bwd",
    "--models", "spanet_small,spanet_small:reference,convnext_tiny",
    "--model-modes", "train,infer",
    "--model-batch", "1",
    "--resolution", "32",
    "--model-repeats", "2",
    "--warmup", "1",
    "--repeats", "3",
    "--min-sample-ms", "0",
    "--sweep-sizes", "8,16",
    "--sweep-channels", "4",
    "--sweep-radii", "1,4",
    "--quiet",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    md = out / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Models\n\nkeep me\n\n## spanet-bench\n\n## Later\n\nafter\n")
    argv = TINY + ["--out-dir", str(out), "--results-md", str(md)]
    threads = torch.get_num_threads()
    returned = cli.bench(argv)
    assert torch.get_num_threads() == threads  # --threads 1 held for the run only
    with open(out / "spanet-bench.json", encoding="utf-8") as f:
        loaded = json.load(f)
    return {"returned": returned, "json": loaded, "dir": out, "md": md}


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_stats(stats, n):
    assert stats["n"] == n
    assert all(_finite_positive(stats[k]) for k in ("median", "q1", "q3", "min", "max"))
    assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]


def _check_ratio(ratio):
    assert all(_finite_positive(ratio[k]) for k in ("median", "q1", "q3"))
    assert ratio["q1"] <= ratio["median"] <= ratio["q3"]


def test_json_equals_returned_results(tiny_run):
    assert tiny_run["json"] == json.loads(json.dumps(tiny_run["returned"]))
    assert tiny_run["json"]["schema"] == "spanet-bench/1"


def test_machine_record(tiny_run):
    machine = tiny_run["json"]["machine"]
    assert machine["torch"] == torch.__version__
    assert machine["torch_threads"] == 1  # --threads 1
    assert machine["spanet_ops"] == spanet_ops.__version__
    assert machine["cpu"] and machine["device"] == "cpu" and machine["gpu"] is None
    try:
        import triton
    except ImportError:
        assert machine["triton"] is None
    else:
        assert machine["triton"] == triton.__version__
    assert machine["kernels"]["pytorch"] is True


def test_operator_rows_cover_every_case(tiny_run):
    rows = tiny_run["json"]["operators"]
    want = {
        (op, (1, c, h, h), r, dtype, mode)
        for op in ("spectral_mask_filter", "spg_aggregate")
        for c, h, r in ((6, 8, 1.0), (9, 5, 2.0))
        for dtype in ("fp32", "bf16")
        for mode in ("fwd", "fwd+bwd")
    }
    got = [(r["op"], tuple(r["shape"]), r["radius"], r["dtype"], r["mode"]) for r in rows]
    assert sorted(got) == sorted(want)
    for row in rows:
        assert set(row["time_ms"]) == {"reference", "fft", "lowrank", "auto"}
        for stats in row["time_ms"].values():
            _check_stats(stats, 3)
        assert set(row["speedup"]) == {"fft", "lowrank", "auto"}
        for ratio in row["speedup"].values():
            _check_ratio(ratio)
        assert set(row["speedup_vs_fft"]) == {"lowrank", "auto"}
        assert row["baseline_dtype"] == "fp32"
        h = row["shape"][-1]
        expected_auto = plans.circular_plan(h, h, row["radius"], (0.7,), None, torch.float32, "cpu").filter_algorithm
        assert row["auto_algorithm"] == expected_auto


def test_module_rows(tiny_run):
    rows = tiny_run["json"]["modules"]
    got = sorted((tuple(r["shape"]), r["dtype"], r["mode"]) for r in rows)
    want = sorted(((1, c, h, h), d, m) for c, h in ((6, 8), (9, 5)) for d in ("fp32", "bf16") for m in ("fwd", "fwd+bwd"))
    assert got == want
    for row in rows:
        assert set(row["time_ms"]) == {"reference", "fft", "fused"}
        for ratio in row["speedup"].values():
            _check_ratio(ratio)


def test_model_rows(tiny_run):
    rows = tiny_run["json"]["models"]
    assert sorted((r["model"], r["mode"]) for r in rows) == sorted(
        (m, mode) for m in KNOWN_PARAMS for mode in ("train", "infer")
    )
    for row in rows:
        assert round(row["params_m"] * 1e6) == KNOWN_PARAMS[row["model"]]
        _check_stats(row["step_ms"], 2)
        ips = row["images_per_s"]
        assert math.isclose(ips["median"], 1e3 / row["step_ms"]["median"], rel_tol=1e-9)  # batch 1
        _check_ratio(row["relative"])
        if row["model"] == "spanet_small":  # the baseline against itself, round by round
            assert row["relative"] == {"median": 1.0, "q1": 1.0, "q3": 1.0}
        # Parameters alone (fp32) are resident; training adds gradients' and AdamW's state.
        assert row["resident_memory_mib"] >= KNOWN_PARAMS[row["model"]] * 4 / 2**20
        if row["mode"] == "train":
            assert row["resident_memory_mib"] >= 3 * KNOWN_PARAMS[row["model"]] * 4 / 2**20
            assert row["peak_step_memory_mib"] > 0


def test_sweep_rows_and_auto_choice(tiny_run):
    data = tiny_run["json"]
    rows = data["sweep"]
    assert sorted((r["size"], r["mask"]) for r in rows) == sorted(
        (s, m) for s in (8, 16) for m in ("circular r=1", "circular r=4", "general")
    )
    for row in rows:
        if row["mask"] == "general":
            assert row["n_rows"] == row["n_cols"] == row["size"]  # every bin differs
        elif row["mask"] == "circular r=1":
            assert row["n_rows"] == row["n_cols"] == 3  # frequencies -1, 0, 1
        assert row["auto"] == plans.preferred_algorithm(row["size"], row["size"], row["n_rows"], row["n_cols"], "cpu")
        assert row["faster"] == ("lowrank" if row["lowrank_speedup_over_fft"]["median"] > 1 else "fft")
        assert row["agree"] == (row["auto"] == row["faster"])
        _check_ratio(row["lowrank_speedup_over_fft"])
    cal = data["calibration"]
    assert cal["cases"] == len(rows)
    assert cal["cases_agreeing_current"] == sum(r["agree"] for r in rows)
    assert cal["current_fft_cost_factor"] == plans.FFT_COST_FACTOR["cpu"]
    assert _finite_positive(cal["fitted_fft_cost_factor"])
    assert 0 <= cal["weighted_agreement_current"] <= cal["weighted_agreement_fitted"] <= 1
    assert len(data["crossovers"]["by_size"]) == 3 and len(data["crossovers"]["by_radius"]) == 2


def test_png_and_markdown(tiny_run):
    png = (tiny_run["dir"] / "spanet-bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 500 and height > 1000  # four panels
    text = tiny_run["md"].read_text()
    # Inserted at the end of its own section; the sections around it are untouched.
    assert text.startswith("# Benchmark results\n\n## Models\n\nkeep me\n\n## spanet-bench\n\n### ")
    assert text.endswith("\n## Later\n\nafter\n")
    terminal = report.render_text(tiny_run["json"])
    assert terminal.startswith("machine: ")
    assert sum(line.startswith("spectral_mask_filter ") for line in terminal.splitlines()) == 8
    block = text[text.index("### "):text.index("## Later")]
    assert "Machine: " in block and "| op | shape |" in block and "| model | mode |" in block
    assert block.count("| spectral_mask_filter |") == 8


def test_unknown_model_is_a_clear_error(capsys):
    for name, message in (
        ("no_such_model", "unknown model 'no_such_model'"),
        ("spanet_small:nope", "unknown spectral_impl 'nope'"),
        ("convnext_tiny:reference", "applies to spanet_* models only"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli.parse_args(["--levels", "model", "--models", name])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--levels", "ops,nope"], "--levels: nope not in"),
        (["--dtypes", "fp16"], "--dtypes: fp16 not in"),
        (["--shapes", "64:56"], "must be CHANNELS:SIZE:RADIUS"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_options_are_clear_errors(capsys, argv, message):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_module_entry_point_runs(monkeypatch, capsys):
    # `python -m spanet.bench` (run here in-process: a fresh interpreter would spend its time importing
    # torch) and the console script spanet.bench:main share cli.main.
    monkeypatch.setattr(sys, "argv", ["spanet-bench", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("spanet.bench", run_name="__main__")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: spanet-bench") and "--quick" in out
    from spanet import bench

    assert bench.main is cli.main


def test_stats_known_values():
    s = measure.Stats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert measure.Stats.of([7.0]).scaled(2.0) == {"median": 14.0, "q1": 14.0, "q3": 14.0, "min": 14.0, "max": 14.0, "n": 1}
    assert measure.paired_ratio([2.0, 6.0, 4.0], [1.0, 2.0, 1.0]) == {"median": 3.0, "q1": 2.5, "q3": 3.5}


def test_time_interleaved_rotates_and_counts():
    calls = []
    candidates = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    samples = measure.time_interleaved(candidates, device=torch.device("cpu"), warmup=2, repeats=3)
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}
    # Warm-up (2) per candidate, then rounds in rotated order.
    assert calls[:6] == list("aabbcc")
    assert "".join(calls[6:]) == "abc" + "bca" + "cab"
    calls.clear()
    measure.time_interleaved(candidates, device=torch.device("cpu"), warmup=0, repeats=1, min_sample_s=1e-9)
    # At least one warm-up call, one more to size the samples, then the round.
    assert calls == list("aabbcc") + list("abc")


def test_peak_memory_known_value():
    mib = 2**20

    def step():
        a = torch.ones(mib // 4)  # 1 MiB
        b = torch.ones(2 * mib // 4)  # 2 MiB, while a lives: peak 3 MiB
        del a
        c = torch.ones(mib // 4)  # 1 MiB: 3 MiB again, not more
        return float(b[0] + c[0])

    peak = measure.peak_step_memory(step, torch.device("cpu"))
    assert 3 * mib <= peak < 3 * mib + 64 * 1024


def test_calibrate_known_threshold():
    def row(factor, faster, ratio):
        return {"break_even_factor": factor, "faster": faster, "agree": True,
                "lowrank_speedup_over_fft": {"median": ratio}}

    rows = [row(2.0, "lowrank", 2.0), row(4.0, "lowrank", 1.5), row(6.0, "fft", 0.5), row(8.0, "fft", 0.25)]
    cal = sweep.calibrate(rows)
    assert cal["fitted_fft_cost_factor"] == 5.0
    assert cal["weighted_agreement_fitted"] == 1.0


def test_parse_shapes():
    assert [(s.channels, s.size, s.radius) for s in parse_shapes("64:56:2, 320:14:1")] == [(64, 56, 2.0), (320, 14, 1.0)]
    with pytest.raises(ValueError, match="CHANNELS >= 3"):
        parse_shapes("2:8:1")


def test_append_markdown_without_section(tmp_path):
    path = tmp_path / "R.md"
    path.write_text("# Results\n")
    report.append_markdown(str(path), "### block\n")
    assert path.read_text() == f"# Results\n\n{report.RESULTS_SECTION}\n\n### block\n"


def test_from_json_merges_levels(tiny_run, tmp_path):
    ops_only = dict(tiny_run["json"], operators=[], settings=dict(tiny_run["json"]["settings"], argv="first"))
    first = tmp_path / "first.json"
    first.write_text(json.dumps(ops_only))
    merged = cli.bench(["--from-json", str(first), str(tiny_run["dir"] / "spanet-bench.json"),
                        "--out-dir", str(tmp_path), "--no-plot", "--levels", "ops"])
    for level in ("operators", "modules", "models", "sweep", "calibration"):
        assert merged[level] == tiny_run["json"][level]  # the later file's levels win
    assert merged["machine"] == tiny_run["json"]["machine"]
    assert merged["merged_runs"] == ["first", tiny_run["json"]["settings"]["argv"]]
    with pytest.raises(SystemExit):
        cli.bench(["--from-json", str(tmp_path / "missing.json"), "--levels", "ops"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_operator_rows(tmp_path):
    results = cli.bench(["--device", "cuda", "--levels", "ops,sweep", "--shapes", "6:8:1", "--batch", "1",
                         "--repeats", "2", "--min-sample-ms", "0", "--sweep-sizes", "8", "--sweep-channels", "4",
                         "--sweep-radii", "1", "--out-dir", str(tmp_path), "--no-plot", "--quiet"])
    assert results["machine"]["gpu"] == torch.cuda.get_device_name()
    assert len(results["operators"]) == 8
    for row in results["operators"]:
        for ratio in row["speedup"].values():
            _check_ratio(ratio)
    assert all(r["auto"] == plans.preferred_algorithm(8, 8, r["n_rows"], r["n_cols"], "cuda") for r in results["sweep"])
