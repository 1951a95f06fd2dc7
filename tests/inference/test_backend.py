"""Backends: onnxruntime by default on a CPU, with the same predictions table as eager PyTorch;
graphs exported once into the cache, atomically, rebuilt when damaged; int8 behind a flag."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    attach_tiny_familiarity,
    check_not_saturated,
    make_spread_packaged,
    make_tiny_packaged,
    spread_images,
)
from scipy.stats import spearmanr

from skinlesion.cli import main
from skinlesion.core.errors import ConfigError
from skinlesion.core.runtime import Runtime, resolve_runtime
from skinlesion.inference.backend import (
    COMPLETE_FILE,
    _publish,
    cached_graph,
    entry_is_complete,
    onnx_cache_dir,
    resolve_backend,
)
from skinlesion.inference.onnx_export import ONNX_FILE, export_onnx
from skinlesion.inference.resolve import resolve_model

CPU = resolve_runtime("cpu")


@pytest.fixture(scope="module")
def lesions(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return spread_images(tmp_path_factory.mktemp("lesions"), n=24)


@pytest.fixture(scope="module")
def spread(lesions: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose p(mel) and unfamiliarity spread across their thresholds on ``lesions``."""
    folder = make_spread_packaged(tmp_path_factory.mktemp("zoo"), lesions[::2])
    return attach_tiny_familiarity(folder, lesions[::2], lesions[1::4])


def _probs(table: pd.DataFrame, classes: list[str]) -> np.ndarray:
    return table[classes].to_numpy(dtype=float)


def test_auto_is_onnx_on_cpu_torch_on_cuda() -> None:
    cuda = Runtime(torch.device("cuda"), None, False)
    assert resolve_backend("auto", CPU) == "onnx" and resolve_backend("auto", cuda) == "torch"
    assert resolve_backend("torch", CPU) == "torch"
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_backend("onnx", cuda)
    with pytest.raises(ConfigError, match="not one of auto, torch, onnx, onnx-int8"):
        resolve_backend("tensorrt", CPU)


def test_default_backend_gives_the_eager_table(spread: Path, lesions: list[Path]) -> None:
    eager = resolve_model(spread, CPU, backend="torch")
    default = resolve_model(spread, CPU)
    assert eager.graph is None and default.backend == "onnx" and default.graph is not None
    a, b = eager.predict(lesions, batch_size=5), default.predict(lesions, batch_size=5)
    classes = eager.class_names
    # The fixture is informative: flags, refer decisions and unfamiliarity on both sides.
    assert a["melanoma_flag"].nunique() == 2 and (a["unfamiliarity"] > 1).any()
    assert np.abs(_probs(a, classes) - _probs(b, classes)).max() <= 1e-4
    np.testing.assert_allclose(b["unfamiliarity"], a["unfamiliarity"], rtol=1e-4, atol=1e-4)
    rest = [c for c in a.columns if c not in (*classes, "unfamiliarity")]
    pd.testing.assert_frame_equal(a[rest], b[rest])


def test_cli_predict_default_matches_torch(spread: Path, lesions: list[Path], tmp_path) -> None:
    images = [str(p) for p in lesions[:6]]
    a, b = tmp_path / "torch.csv", tmp_path / "auto.csv"
    assert resolve_model(spread, CPU).graph is not None  # cached: the CLI's auto runs it
    common = ["predict", "--no-progress", "--model", str(spread), *images]
    assert main([*common, "--backend", "torch", "--output", str(a)]) == 0
    assert main([*common, "--output", str(b)]) == 0
    ta, tb = pd.read_csv(a), pd.read_csv(b)
    classes = resolve_model(spread, CPU, backend="torch").class_names
    assert np.abs(_probs(ta, classes) - _probs(tb, classes)).max() <= 1e-4
    assert ta["prediction"].tolist() == tb["prediction"].tolist()


def test_a_first_small_prediction_runs_on_pytorch_and_exports_nothing(
    tmp_path: Path, lesions: list[Path], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from skinlesion.inference import backend

    monkeypatch.setenv("SKINLESION_CACHE", str(tmp_path / "cache"))
    folder = make_tiny_packaged(tmp_path / "zoo", "first")
    few = backend.EXPORT_PAYS_OFF - 1
    small = resolve_model(folder, CPU, images=few)
    assert small.backend == "torch" and small.graph is None
    assert not onnx_cache_dir().exists() or not any(onnx_cache_dir().iterdir())
    args = ["predict", "--no-progress", "--model", str(folder), *map(str, lesions[:3])]
    assert main(args) == 0 and "WARNING" not in capsys.readouterr().err
    assert not onnx_cache_dir().exists() or not any(onnx_cache_dir().iterdir())
    # Enough images to pay for the export: exported, and then used by small calls too.
    large = resolve_model(folder, CPU, images=backend.EXPORT_PAYS_OFF)
    assert large.backend == "onnx" and large.graph is not None
    again = resolve_model(folder, CPU, images=1)
    assert again.graph is not None and again.graph.folder == large.graph.folder
    # Unknown counts (serve, load_model) and a forced backend export as before.
    assert resolve_model(folder, CPU, backend="onnx", tta=1, images=1).graph is not None


def test_graph_is_exported_once_per_model_and_tta(tiny_packaged: Path) -> None:
    resolve_model(tiny_packaged, CPU)
    entries = sorted(p for p in onnx_cache_dir().iterdir() if not p.name.startswith("."))
    stamp = {p: (p / ONNX_FILE).stat().st_mtime_ns for p in entries}
    model = resolve_model(tiny_packaged, CPU)
    assert {p: (p / ONNX_FILE).stat().st_mtime_ns for p in entries} == stamp
    assert model.graph is not None and model.graph.folder in entries
    other = resolve_model(tiny_packaged, CPU, tta=1)
    assert other.graph is not None and other.graph.tta == 1
    assert other.graph.folder != model.graph.folder
    from skinlesion.inference import backend

    key = backend.graph_key(model.members, 2, True)
    assert key != backend.graph_key(model.members, 2, False)
    with pytest.MonkeyPatch.context() as mp:  # quantized another way: another int8 entry
        mp.setattr(backend, "QUANTIZATION_ID", "another-quantization")
        assert backend.graph_key(model.members, 2, True) != key


def test_truncated_graph_in_the_cache_is_rebuilt(tmp_path: Path) -> None:
    folder = make_tiny_packaged(tmp_path / "zoo", "trunc")
    model = resolve_model(folder, CPU, backend="torch")
    entry = cached_graph(model, root=tmp_path / "cache")
    graph = entry / ONNX_FILE
    size = graph.stat().st_size
    graph.write_bytes(graph.read_bytes()[: size // 2])
    assert not entry_is_complete(entry)
    again = cached_graph(model, root=tmp_path / "cache")
    assert again == entry and entry_is_complete(entry) and graph.stat().st_size == size
    (entry / COMPLETE_FILE).unlink()  # an entry without its completion record: rebuilt too
    assert cached_graph(model, root=tmp_path / "cache") == entry and entry_is_complete(entry)


def test_a_loser_of_the_race_uses_the_winners_entry(tiny_packaged: Path, tmp_path: Path) -> None:
    model = resolve_model(tiny_packaged, CPU, backend="torch")
    first, second, final = tmp_path / ".tmp-a", tmp_path / ".tmp-b", tmp_path / "entry"
    export_onnx(model, first)
    export_onnx(model, second)
    assert _publish(first, final, replace=False) == final
    winner = (final / ONNX_FILE).read_bytes()
    assert _publish(second, final, replace=False) == final
    assert (final / ONNX_FILE).read_bytes() == winner and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


_EXPORT = """
import sys
from skinlesion.core.runtime import resolve_runtime
from skinlesion.inference.backend import cached_graph
from skinlesion.inference.resolve import resolve_model
model = resolve_model(sys.argv[1], resolve_runtime("cpu"), backend="torch")
print(cached_graph(model))
"""


@pytest.mark.slow
def test_two_processes_exporting_at_once_share_one_entry(tmp_path: Path) -> None:
    folder = make_tiny_packaged(tmp_path / "zoo", "race", members=1, size=32)
    env = {**os.environ, "SKINLESION_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _EXPORT, str(folder)], env=env, stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].decode().strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]
    assert [p.name for p in (tmp_path / "cache" / "onnx").iterdir()] == [Path(outs[0]).name]
    assert entry_is_complete(Path(outs[0]))


def test_fused_model_falls_back_or_refuses(tmp_path: Path, lesions: list[Path], caplog) -> None:
    folder = make_tiny_packaged(tmp_path / "zoo", "fused", metadata=True)
    # Forced onnx: images alone run on the graph; metadata values are refused, never dropped.
    forced = resolve_model(folder, CPU, backend="onnx")
    meta = [{"age": 70, "sex": "female", "localization": "face"}] * 4
    with pytest.raises(ConfigError, match="patient metadata was given, which the graph"):
        forced.predict_proba(lesions[:4], metadata=meta)
    images_only, _ = forced.predict_proba(lesions[:4])
    assert forced.engines_used == {"onnx"}
    eager, auto = resolve_model(folder, CPU, backend="torch"), resolve_model(folder, CPU)
    with caplog.at_level(logging.INFO, logger="skinlesion.inference.backend"):
        got, _ = auto.predict_proba(lesions[:4], metadata=meta)
    assert "running on PyTorch, not ONNX: patient metadata" in caplog.text
    assert auto.backend == "onnx" and auto.engines_used == {"torch"}  # what ran is recorded
    expected, _ = eager.predict_proba(lesions[:4], metadata=meta)
    np.testing.assert_array_equal(got, expected)  # the eager path itself
    without, _ = eager.predict_proba(lesions[:4])
    assert np.abs(got - without).max() > 1e-3  # the metadata moves the prediction
    graph, _ = auto.predict_proba(lesions[:4])
    assert np.abs(graph - without).max() <= 1e-4
    assert np.abs(images_only - without).max() <= 1e-4
    assert auto.engines_used == {"onnx", "torch"}


def test_forced_onnx_refuses_another_tta(tiny_packaged: Path, lesions: list[Path]) -> None:
    model = resolve_model(tiny_packaged, CPU, backend="onnx")
    with pytest.raises(ConfigError, match="TTA 1 differs from the graph's 2"):
        model.predict_proba(lesions[:2], tta=1)


def test_int8_export_and_backend(lesions: list[Path], tmp_path) -> None:
    """The int8 graph is the quantized model (not the fp32 graph) and keeps its answers: on a
    model whose p(mel) spreads across the images, int8 p(mel) ranks the images as fp32 does
    and stays within a tenth of that spread. The bounds are relative to what the model does,
    not a number that any near-constant output would meet, and hold whatever int8 kernels the
    CPU has (VNNI or not: onnxruntime's u8s8 path can lose a bit of precision without it).
    The model is a spread model of its own: its int8 graph stays out of the module's ``spread``."""
    spread = make_spread_packaged(tmp_path / "zoo", lesions[::2], name="spread_int8")
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in lesions[::2]:
        (calib / p.name).write_bytes(p.read_bytes())
    images = [str(p) for p in lesions[::2]]
    predict = ["predict", "--no-progress", "--model", str(spread), *images]
    assert main([*predict, "--backend", "onnx-int8"]) == 2  # no int8 graph yet
    out = tmp_path / "int8"
    export = ["export", "--model", str(spread), "--int8", "--output", str(out)]
    assert main(export) == 2  # --calibration-images is required
    assert main([*export, "--calibration-images", str(calib), "--calibration-count", "8"]) == 0
    spec = json.loads((out / "spec.json").read_text())
    assert spec["quantization"]["calibration_images"] == 8
    a, b = tmp_path / "fp32.csv", tmp_path / "int8.csv"
    assert main([*predict, "--backend", "onnx", "--output", str(a)]) == 0
    assert main([*predict, "--backend", "onnx-int8", "--output", str(b)]) == 0
    classes = resolve_model(spread, CPU, backend="torch").class_names
    fp32, int8 = _probs(pd.read_csv(a), classes), _probs(pd.read_csv(b), classes)
    check_not_saturated(fp32)
    mel = classes.index("mel")
    spread_mel = fp32[:, mel].max() - fp32[:, mel].min()
    diff = np.abs(fp32 - int8).max()
    rho = spearmanr(fp32[:, mel], int8[:, mel]).statistic
    print(f"int8: max |diff| {diff:.4f}, p(mel) spread {spread_mel:.3f}, Spearman {rho:.3f}")
    assert 0 < diff < 0.1 * spread_mel, (diff, spread_mel)  # quantized, and close to fp32
    assert rho > 0.9
    np.testing.assert_allclose(int8.sum(axis=1), 1.0, atol=1e-5)  # the softmax tail stays fp32
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / ONNX_FILE)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_decode_workers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from skinlesion.inference.predict import DECODE_WORKERS_ENV, decode_workers

    monkeypatch.setenv(DECODE_WORKERS_ENV, "3")
    assert decode_workers() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(DECODE_WORKERS_ENV, bad)
        with pytest.raises(ConfigError, match=DECODE_WORKERS_ENV):
            decode_workers()
    monkeypatch.delenv(DECODE_WORKERS_ENV)
    assert 1 <= decode_workers() <= 8


def test_predict_e2e_benchmark_times_each_backend_and_one_decode_thread(
    spread: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from skinlesion.benchmark.predict_e2e import bench_predict_e2e
    from skinlesion.benchmark.tables import format_table
    from skinlesion.inference import predict

    pools: list[int | None] = []

    def pool(max_workers: int | None = None) -> ThreadPoolExecutor:
        pools.append(max_workers)
        return ThreadPoolExecutor(max_workers)

    monkeypatch.setattr(predict, "ThreadPoolExecutor", pool)
    result = bench_predict_e2e(
        str(spread), None, n_images=6, size=(64, 48), backends=("torch", "onnx", "onnx-int8")
    )
    rows = result["results"]
    assert [r["backend"] for r in rows] == ["torch", "onnx", "onnx-int8", "onnx"]
    assert "int8" in rows[2]["skipped"]  # no int8 graph was made for this model
    assert rows[3]["decode_threads"] == 1 and rows[1]["decode_threads"] >= 1
    for r in (rows[1], rows[3]):
        assert r["max_abs_diff_vs_torch"] <= 1e-4 and r["speedup_vs_torch"] > 0
    assert pools[-1] == 1 and max(pools) == rows[1]["decode_threads"]  # the pools it ran
    assert predict.DECODE_WORKERS_ENV not in os.environ  # a parameter, not the environment
    assert "decode threads" in format_table(result)


def test_load_model_takes_the_backend(spread: Path) -> None:
    import skinlesion

    assert skinlesion.load_model(spread, device="cpu").backend == "onnx"
    assert skinlesion.load_model(spread, device="cpu", backend="torch").backend == "torch"
    with pytest.raises(ConfigError, match="backend 'tensorrt'"):
        skinlesion.load_model(spread, device="cpu", backend="tensorrt")
