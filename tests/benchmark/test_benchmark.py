"""The benchmarks on CPU at toy sizes: they run, report plain types, and the CLI writes JSON."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from skinlesion.benchmark.loader import bench_loader
from skinlesion.benchmark.model_predict import bench_model_predict
from skinlesion.benchmark.predict import bench_predict
from skinlesion.benchmark.tables import format_table
from skinlesion.benchmark.train import bench_train
from skinlesion.cli.bench import add_benchmark_parser
from skinlesion.core.errors import ConfigError, DataError
from skinlesion.core.runtime import torch_threads

REPO = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: timings stay sane when other tests share the CPU cores (several
    OpenMP threads on busy cores slow down by 10x, and not evenly)."""
    with torch_threads(1):
        yield


def test_bench_train_reports_both_rates_and_their_ratio() -> None:
    r = bench_train("tf_efficientnet_lite0", 64, 8, steps=3, warmup=1, device="cpu", images=64)
    assert r["model_only"]["images_per_s"] > 0
    assert r["end_to_end"]["images_per_s"] > 0
    assert 0 < r["ratio"] <= 2
    assert r["ratio"] == pytest.approx(
        r["end_to_end"]["images_per_s"] / r["model_only"]["images_per_s"]
    )
    # No autocast on CPU; channels_last applies there too (faster depthwise convolutions).
    assert r["device"] == "cpu" and r["amp_dtype"] is None and r["channels_last"] is True
    assert "pretrained=False" in r["weights"]
    assert r["hardware"]["cpu_count"] >= 1
    json.dumps(r, allow_nan=False)
    table = format_table(r)
    assert "ratio end-to-end / model-only" in table and "tf_efficientnet_lite0" in table


def test_bench_loader_cache_beats_decoding(tmp_path: Path) -> None:
    r = bench_loader(
        None,
        64,
        batch_size=8,
        batches=3,
        cache_dir=tmp_path / "cache",
        synthetic_images=20,
    )
    assert r["cache"]["images_per_s"] > 0 and r["decode"]["images_per_s"] > 0
    assert r["ratio"] > 1
    assert r["source_image_size"] == [600, 450] and r["cache_reused"] is False
    assert any((tmp_path / "cache").iterdir())  # the cache went where it was asked to
    json.dumps(r, allow_nan=False)
    assert "ratio cache / decode" in format_table(r)


def test_bench_predict_reports_latency_and_throughput() -> None:
    r = bench_predict(
        "tf_efficientnet_lite0", 64, batch_sizes=(1, 4), steps=3, warmup=1, device="cpu"
    )
    assert [x["batch_size"] for x in r["results"]] == [1, 4]
    for x in r["results"]:
        assert 0 < x["median_ms"] <= x["p95_ms"] and x["images_per_s"] > 0
    assert r["latency_median_ms"] == r["results"][0]["median_ms"]
    json.dumps(r, allow_nan=False)
    assert "median ms" in format_table(r)


def test_format_table_refuses_unknown_results() -> None:
    with pytest.raises(ValueError, match="unknown benchmark"):
        format_table({"benchmark": "nope"})


def test_bad_arguments_are_the_users_fault_named_before_any_work() -> None:
    """A ConfigError (one line from the CLI, exit 2) that names the values, raised before a
    model is built or a cache written; a selection of no images is a DataError."""
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        bench_train("tf_efficientnet_lite0", 64, 1, device="cpu")
    with pytest.raises(ConfigError, match=r"got \[0\]"):
        bench_predict("tf_efficientnet_lite0", 64, batch_sizes=[0], device="cpu")
    with pytest.raises(ConfigError, match="batches >= 1"):
        bench_loader(None, 64, batches=0)
    with pytest.raises(ConfigError, match="steps >= 1"):
        bench_model_predict(None, steps=0)
    with pytest.raises(DataError, match="no images found"):
        bench_loader(None, 64, max_images=0, synthetic_size=(16, 12), synthetic_images=7)


def test_cli_handler_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="skinlesion")
    add_benchmark_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "sub" / "predict.json"
    args = parser.parse_args(
        ["benchmark", "predict", "--backbone", "tf_efficientnet_lite0", "--image-size", "64",
         "--batch-size", "2", "--steps", "2", "--warmup", "1", "--device", "cpu",
         "--json", str(out)]
    )  # fmt: skip
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "predict"
    assert [x["batch_size"] for x in result["results"]] == [1, 2]
    assert "| batch |" in capsys.readouterr().out


def test_cli_rejects_a_bad_synthetic_size() -> None:
    parser = argparse.ArgumentParser(prog="skinlesion")
    add_benchmark_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["benchmark", "loader", "--synthetic-size", "600"])


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_gpu_check_script_parses() -> None:
    script = REPO / "bench" / "gpu_check.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
