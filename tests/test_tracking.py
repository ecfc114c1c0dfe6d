"""tracking: what --log tensorboard and --log mlflow record, read back; a failing tracker loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, quiet, tiny

from bloodcell.cli import main
from bloodcell.errors import BloodcellError
from bloodcell.training import tracking
from bloodcell.training.train import train


def _mlflow_store(tmp_path: Path, monkeypatch) -> str:
    """A file store in tmp (MLflow 3 keeps it behind this switch; its sqlite store takes ~9 s to make)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def test_tensorboard_records_config_epochs_and_final_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    metrics = train(tiny(log=("tensorboard",)), out, log=quiet, progress=False)
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    history = (out / "history.csv").read_text().splitlines()
    val_acc = [float(line.split(",")[4]) for line in history[1:]]
    assert [e.step for e in ea.Scalars("val/acc")] == [1, 2]
    assert [e.value for e in ea.Scalars("val/acc")] == pytest.approx(val_acc, abs=1e-6)
    assert ea.Scalars("final/test/accuracy")[0].value == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "model: cnn2x32" in text and "epochs: 2" in text


@pytest.mark.slow
def test_mlflow_records_params_metrics_and_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = _mlflow_store(tmp_path, monkeypatch)
    out = tmp_path / "run"
    metrics = train(tiny(log=("mlflow",), mlflow_uri=uri), out, log=quiet, progress=False)
    state = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(uri)
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "cnn2x32" and run.data.params["epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1, 2]
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert {"metrics.json", "history.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_compare_with_folds_logs_the_report_and_the_summary_to_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from bloodcell.studies.compare import compare

    uri = _mlflow_store(tmp_path, monkeypatch)
    out = tmp_path / "cmp"
    shared = {**{k: v for k, v in TINY.items() if k != "model"}, "epochs": 1, "folds": 2,
              "log": ["mlflow", "tensorboard"], "mlflow_uri": uri}
    res = compare(["cnn2x32"], shared, out, log=quiet, progress=False)
    client = MlflowClient(uri)
    run = client.get_run(json.loads((out / "tracking.json").read_text())["mlflow_run_id"])
    assert {"report.md", "report.html", "results.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.metrics["cnn2x32/test/accuracy"] == pytest.approx(res["models"][0]["test"]["accuracy"])
    cv = client.get_run(json.loads((out / "runs" / "cnn2x32" / "tracking.json").read_text())["mlflow_run_id"])
    assert cv.data.metrics["cv/test/accuracy_mean"] == pytest.approx(res["models"][0]["cv"]["test"]["accuracy"]["mean"])
    if tracking.importlib.util.find_spec("tensorboard") is not None:  # the report as text beside the scalars
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
        ea.Reload()
        assert "Cross-validation" in ea.Tensors("report/text_summary")[0].tensor_proto.string_val[0].decode()
    # every fold is a tracked run of its own, and a rerun with another --log is the same protocol
    assert all((out / "runs" / "cnn2x32" / "folds" / k / "tracking.json").is_file() for k in "01")
    compare(["cnn2x32"], {**shared, "log": []}, out, log=quiet, progress=False, report=False)


def test_a_failing_tracker_warns_once_and_the_run_finishes(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")

    def broken(self, step, row):
        raise OSError("disk full")

    monkeypatch.setattr(tracking._TensorBoard, "epoch", broken)
    logs: list[str] = []
    metrics = train(tiny(log=("tensorboard",)), tmp_path / "run", log=logs.append, progress=False)
    warnings = [m for m in logs if m.startswith("warning: tensorboard logging failed")]
    assert len(warnings) == 1 and "disk full" in warnings[0]
    assert (tmp_path / "run" / "DONE").exists() and metrics["test"]["n"] > 0
    assert len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 3  # both epochs kept


def test_an_unreachable_mlflow_store_warns_and_the_run_finishes(tmp_path):
    pytest.importorskip("mlflow")
    logs: list[str] = []
    train(tiny(log=("mlflow",), mlflow_uri="nosuchscheme://x"), tmp_path / "run", log=logs.append, progress=False)
    assert any(m.startswith("warning: mlflow logging failed") for m in logs)
    assert (tmp_path / "run" / "DONE").exists()


def test_a_tracker_not_installed_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n: None if n == "mlflow" else real(n))
    with pytest.raises(BloodcellError, match=r"pip install 'bloodcell\[mlflow\]'"):
        train(tiny(log=("mlflow",)), tmp_path / "run", log=quiet, progress=False)
    assert not (tmp_path / "run").exists()
    assert main(["train", "--data", "synthetic:96", "--log", "tensorboard", "--log", "mlflow",
                 "--out", str(tmp_path / "cli")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "cli").exists()


def test_log_flags_parse_repeated_or_comma_separated():
    from bloodcell.cli import build_parser
    from bloodcell.cli.flags import train_config

    p = build_parser()
    for argv in (["--log", "tensorboard", "--log", "mlflow"], ["--log", "tensorboard,mlflow"]):
        assert train_config(p.parse_args(["train", *argv])).log == ("tensorboard", "mlflow")
    assert main(["train", "--log", "wandb"]) == 2


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = _mlflow_store(tmp_path, monkeypatch)
    out = tmp_path / "run"

    def stop(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(log=("mlflow",), mlflow_uri=uri), out, log=quiet, progress=False, on_epoch=stop)
    first = json.loads((out / "tracking.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri)
    assert client.get_run(first).info.status == "FAILED"
    train(tiny(), out, resume=True, log=quiet, progress=False)
    assert json.loads((out / "tracking.json").read_text())["mlflow_run_id"] == first
    assert client.get_run(first).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first, "val/acc")] == [1, 2]
