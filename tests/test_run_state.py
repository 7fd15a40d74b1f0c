"""No stale state survives a new run (issue 17, item 6): every run has an id and a start time, its
metrics.json names them and lists its figures, `start_run` moves an earlier run's outputs aside,
metrics.json is written atomically, and the readers (RESULTS via `coursebuild`, notebook 07's
course table via `coursebuild.records.results_table`) flag folders and tables that mix runs.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from coursebuild import records, results, run_all
from helpers import runs

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108020000009077"
    "53de0000000c4944415478da63f8cfc000000301010018dd8db00000000049454e44ae426082")
BLOCK = {"accuracy": 0.75, "balanced_accuracy": 0.7, "auc": 0.8, "per_class": {}, "confusion_matrix": [[3, 1], [1, 3]],
         "ci95": {"auc": [0.6, 0.9]}}


def _old_run(folder: Path, notebook: str, profile: str = "cpu", figures=("roc.png",), **fields) -> dict:
    """A folder as an earlier run left it: its metrics.json and figures."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in figures:
        (folder / name).write_bytes(PNG)
    record = {"notebook": notebook, "profile": profile, "dataset": "pneumonia", "model": "mobilenet_v2",
              "pretrained": True, "image_size": 128, "test": BLOCK, "figures": list(figures), **fields}
    (folder / "metrics.json").write_text(json.dumps(record))
    return record


def _run(folder: Path, notebook: str = "04_x") -> runs.Run:
    return runs.Run(notebook, runs.apply_profile("smoke"), None, folder, torch.device("cpu"), 42)


def test_every_run_has_its_own_id_and_start_time(tmp_path):
    first = runs.start_run("04_x", "smoke", output_dir=str(tmp_path / "a"))
    second = runs.start_run("04_x", "smoke", output_dir=str(tmp_path / "b"))
    assert first.run_id != second.run_id and first.run_id.startswith(first.started_at[:4])
    assert first.metrics_path == tmp_path / "a" / "metrics.json"
    record = runs.save_metrics(first, None, dataset="pneumonia", model="m", pretrained=False,
                               figures=["roc.png"])
    assert record["run_id"] == first.run_id and record["started_at"] == first.started_at
    assert record["figures"] == ["roc.png"]


def test_start_run_moves_an_earlier_runs_outputs_aside(tmp_path):
    out = tmp_path / "assets" / "04_x"
    _old_run(out, "04_x", figures=("roc.png", "gradcam.png"))
    (out / "notes.txt").write_text("mine")  # not an output of a run: stays
    runs.start_run("04_x", "smoke", output_dir=str(out))
    assert sorted(p.name for p in out.iterdir()) == [runs.OUTPUTS_FILE, ".previous_run", "notes.txt"]
    assert sorted(p.name for p in (out / ".previous_run").iterdir()) == [
        runs.OUTPUTS_FILE, "gradcam.png", "metrics.json", "roc.png"]


def test_a_run_stopped_half_way_leaves_no_old_metrics_beside_its_figures(tmp_path):
    assets = tmp_path / "assets"
    _old_run(assets / "04_x", "04_x", profile="cpu")
    _old_run(assets / "01_done", "01_done", profile="smoke", run_id="r1", started_at="2026-12-01T00:00:00+00:00")
    run = runs.start_run("04_x", "smoke", output_dir=str(assets / "04_x"))
    (run.out_dir / "roc.png").write_bytes(PNG)  # a new figure; then the run dies before save_metrics
    assert not (assets / "04_x" / "metrics.json").exists()
    text = results.collect_assets(assets).read_text()
    assert "01_done" in text and "04_x" not in text


def test_metrics_json_is_replaced_atomically(tmp_path, monkeypatch):
    run = _run(tmp_path)
    runs.save_metrics(run, None, dataset="pneumonia", model="first", pretrained=False)
    real_write_text = Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        runs.save_metrics(run, None, dataset="pneumonia", model="second", pretrained=False)
    monkeypatch.undo()
    assert json.loads((tmp_path / "metrics.json").read_text())["model"] == "first"


def test_figures_that_metrics_json_does_not_list_are_flagged(tmp_path):
    folder = tmp_path / "04_x"
    _old_run(folder, "04_x", run_id="r1", started_at="2026-12-01T00:00:00+00:00")
    assert records.output_problems(folder) == []
    (folder / "errors.png").write_bytes(PNG)  # from another run
    (folder / "roc.png").unlink()
    assert records.output_problems(folder) == ["listed figures missing: roc.png",
                                                 "figures not from this run: errors.png"]
    row = records.results_table([folder]).iloc[0]
    assert "figures not from this run: errors.png" in row["check"] and row["run_id"] == "r1"


def test_collect_only_flags_a_folder_that_mixes_runs(tmp_path):
    assets = tmp_path / "assets"
    _old_run(assets / "04_x", "04_x", profile="cpu", run_id="r1", started_at="2026-12-01T00:00:00+00:00")
    (assets / "04_x" / "smoke_curve.png").write_bytes(PNG)
    _old_run(assets / "05_y", "05_y", profile="cpu", run_id="r2", started_at="2026-12-01T00:00:00+00:00")
    text = results.collect_assets(assets).read_text()
    assert "Some rows may mix runs" in text
    row = next(line for line in text.splitlines() if line.startswith("| 04_x"))
    assert "figures not from this run: smoke_curve.png" in row
    assert next(line for line in text.splitlines() if line.startswith("| 05_y")).rstrip(" |").endswith("ok")


def test_the_course_table_tells_two_runs_of_one_notebook_apart(tmp_path):
    """Notebook 07 reads assets/ and the folder beside its OUTPUT_DIR: the same notebook twice."""
    _old_run(tmp_path / "assets" / "04_x", "04_x", run_id="r1", started_at="2026-11-22T10:00:00+00:00")
    _old_run(tmp_path / "smoke" / "04_x", "04_x", run_id="r2", started_at="2026-12-02T06:00:00+00:00")
    table = records.results_table([tmp_path / "assets" / "04_x", tmp_path / "smoke" / "04_x"], headline=True)
    assert table["run_id"].tolist() == ["r1", "r2"]
    assert table["started_at"].nunique() == 2
    assert all("2 runs of this notebook" in check for check in table["check"])


def test_metrics_from_before_run_ids_are_flagged(tmp_path):
    _old_run(tmp_path / "04_x", "04_x")
    assert records.output_problems(tmp_path / "04_x") == ["no run id (written before runs had ids)"]


def test_freshness_reads_the_run_start_recorded_in_metrics_json(tmp_path):
    import datetime as dt

    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"profile": "smoke", "started_at": "2026-12-01T00:00:00+00:00"}))
    since = dt.datetime(2026, 12, 2, tzinfo=dt.timezone.utc)
    assert records.read_fresh_metrics(path, since) is None  # written now, but by a run that started before
    assert records.read_fresh_metrics(path, since - dt.timedelta(days=2)) is not None
    assert records.read_fresh_metrics(path, since - dt.timedelta(days=2), profile="cpu") is None


FAILING_BODY = f"""\
from helpers.runs import start_run
run = start_run("04_fails", PROFILE, output_dir=OUTPUT_DIR)
(run.out_dir / "training_curves.png").write_bytes(bytes.fromhex("{PNG.hex()}"))
raise RuntimeError("killed half-way, before save_metrics")
"""


def test_after_a_failed_run_all_collect_only_does_not_report_the_old_profile(tmp_path):
    nbdir, assets = tmp_path / "notebooks", tmp_path / "assets"
    nbdir.mkdir()
    nb = new_notebook(cells=[new_markdown_cell("# Fails"), new_code_cell(
        'PROFILE = "full"\nDATA_DIR = None\nSEED = 42\nOUTPUT_DIR = None', metadata={"tags": ["parameters"]}),
        new_code_cell(FAILING_BODY)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nbdir / "04_fails.ipynb")
    _old_run(assets / "04_fails", "04_fails", profile="cpu", figures=("training_curves.png", "roc.png"))
    _old_run(assets / "01_done", "01_done", profile="smoke", run_id="r1", started_at="2026-12-01T00:00:00+00:00")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = run_all.main(["--profile", "smoke", "--notebooks-dir", str(nbdir), "--build-dir", str(tmp_path / "_build"),
                             "--output-dir-root", str(assets), "--timeout", "120", "--no-site"])
        assert code == 1
        assert run_all.main(["--collect-only", "--notebooks-dir", str(nbdir)]) == 0
    assert not (assets / "04_fails" / "metrics.json").exists()  # no cpu metrics beside smoke figures
    assert "04_fails" not in (assets / "RESULTS.md").read_text()
