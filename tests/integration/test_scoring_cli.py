"""`infermesh models`: the benchmark command runs end to end (numbers are not asserted:
a benchmark is not a timing test) and quantize publishes a working int8 version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from infermesh.cli import main as infermesh
from infermesh.workload import modelgen
from services.scoring.providers import CUDA


def bench_args(repository: Path, batch_sizes: str, *options: str) -> list[str]:
    """`infermesh models bench` on `repository` for 0.2 s at concurrency 2."""
    return [
        "models", "bench", "--repository", str(repository), "--seconds", "0.2",
        "--batch-sizes", batch_sizes, "--concurrency", "2", *options,
    ]  # fmt: skip


def test_models_bench_reports_grpc_and_raw_throughput(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    modelgen.write_version(tmp_path, "ranker", 1, modelgen.mlp_model(0))
    code = infermesh(bench_args(tmp_path, "1,16", "--json"))
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and "onnxruntime" in report["machine"] and report["provider"] == "CPUExecutionProvider"
    assert [row["batch"] for row in report["rows"]] == [1, 16]
    for row in report["rows"]:
        assert row["raw_items_per_s"] > 0 and row["grpc_items_per_s"] > 0 and row["server_mean_batch"] >= 1
        assert row["client_cpu_us"] > 0 and row["server_cpu_us"] > 0  # the server this command started


def test_models_bench_overhead_serves_the_linear_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No model in the repository: --overhead does not need one.
    args = bench_args(tmp_path, "16", "--streaming", "--overhead", "--json")
    assert infermesh(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"].startswith("64 -> 1 linear model") and report["streaming"] is True
    row = report["rows"][0]
    assert row["grpc_items_per_s"] > 0 and row["server_cpu_us"] > 0
    with pytest.raises(SystemExit, match="leave out --target"):
        infermesh([*args, "--target", "127.0.0.1:1"])


def test_linear_model_takes_the_reference_input_and_gives_its_output() -> None:
    linear = ort.InferenceSession(modelgen.linear_model(0), providers=["CPUExecutionProvider"])
    mlp = ort.InferenceSession(modelgen.mlp_model(0), providers=["CPUExecutionProvider"])
    rows = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    assert [(i.name, i.type) for i in linear.get_inputs()] == [(i.name, i.type) for i in mlp.get_inputs()]
    out = linear.run(None, {"features": rows})[0]
    assert out.shape == mlp.run(None, {"features": rows})[0].shape == (5, 1)
    weights = np.frombuffer(modelgen.mlp_weights(0).w3[:64].tobytes(), np.float32).reshape(64, 1)
    assert np.allclose(out, rows @ weights, atol=1e-5)


def test_models_bench_on_cuda_runs_there_or_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    modelgen.write_version(tmp_path, "ranker", 1, modelgen.mlp_model(0))
    args = bench_args(tmp_path, "16", "--provider", "cuda", "--json")
    if CUDA not in ort.get_available_providers():  # a CPU-only host: a clear refusal, no CPU figures
        with pytest.raises(SystemExit, match="needs onnxruntime-gpu"):
            infermesh(args)
        return
    assert infermesh(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["provider"] == CUDA and report["rows"][0]["grpc_items_per_s"] > 0


def test_models_quantize_adds_an_int8_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    modelgen.write_config(tmp_path, "ranker", {"max_batch_size": 256})
    modelgen.write_version(tmp_path, "ranker", 1, modelgen.mlp_model(0))
    (tmp_path / "ranker" / "1" / "provenance.json").write_text(
        json.dumps({"owner": "ranking-team", "source_revision": "9f1c"})
    )
    common = ["models", "quantize", "--repository", str(tmp_path), "--queries", "20", "--seconds", "0.1"]
    assert infermesh([*common, "--dry-run"]) == 0
    assert not (tmp_path / "ranker" / "2").exists()
    capsys.readouterr()
    # The default gate (--max-ndcg-drop 0.01); tests/integration/test_quantize_gate.py fails a damaged model.
    assert infermesh([*common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["new_version"] == 2 and report["int8"]["bytes"] < report["float"]["bytes"]
    assert report["inputs"] == {"features": "float32 x 64"} and 0 <= report["ndcg_drop"] <= 0.01
    sidecar = json.loads((tmp_path / "ranker" / "2" / "quantized.json").read_text())
    assert sidecar["quantized_from"] == 1
    provenance = json.loads((tmp_path / "ranker" / "2" / "provenance.json").read_text())
    assert provenance["owner"] == "ranking-team" and provenance["source_revision"] == "9f1c"  # inherited
    assert provenance["quantized_from"] == "1"
    session = ort.InferenceSession(str(tmp_path / "ranker" / "2" / "model.onnx"), providers=["CPUExecutionProvider"])
    rows = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    reference = ort.InferenceSession(modelgen.mlp_model(0), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"features": rows})[0], reference.run(None, {"features": rows})[0], atol=0.05)
    # Again: the newest float version (1) is quantized, never the int8 one; asked for, it is refused.
    capsys.readouterr()
    assert infermesh([*common, "--json", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["from_version"] == 1
    assert infermesh([*common, "--version", "2"]) == 1
    assert "v2 is already int8" in capsys.readouterr().err


def test_models_commands_refuse_what_names_no_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="no model 'ranker' with a <version>/model.onnx"):
        infermesh(bench_args(tmp_path / "empty", "16"))  # not the generated MLP in its place
    for argv in (["models", "quantize", "--version", "0"], ["models", "bench", "--batch-sizes", "abc"]):
        with pytest.raises(SystemExit) as exited:
            infermesh(argv)
        assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "is not a model version" in err and "whole numbers from 1" in err


def test_models_without_a_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, code in ((["models", "--help"], 0), (["models", "nope"], 2), (["models"], 2)):
        with pytest.raises(SystemExit) as exited:  # argparse's, as every command's
            infermesh(argv)
        assert exited.value.code == code
    captured = capsys.readouterr()
    assert "bench" in captured.out and "quantize" in captured.out and "import" in captured.out
    assert "invalid choice: 'nope'" in captured.err
