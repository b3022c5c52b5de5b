from pathlib import Path

import papermill as pm
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_notebook_runs_headless_on_tiny_data(patches, tmp_path):
    out_nb = tmp_path / "executed.ipynb"
    pm.execute_notebook(
        str(REPO / "train.ipynb"), str(out_nb), cwd=str(REPO), progress_bar=False, kernel_name="python3",
        parameters=dict(SETTINGS=dict(data=str(patches[0]), epochs=1, points=50, pretrained=False, size=32,
                                      arch="tiny", batch_size=4, out=str(tmp_path / "ck"))))
    assert (tmp_path / "ck" / "best_model.pth").is_file()
    assert (tmp_path / "ck" / "output.png").is_file() and (tmp_path / "ck" / "results.png").is_file()
    text = out_nb.read_text()
    assert "best epoch 1: val OA" in text
    assert "image/png" in text  # the figures are shown in the notebook


def test_committed_notebook_has_no_outputs():
    import nbformat

    nb = nbformat.read(REPO / "train.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def test_make_demo_passes_settings_the_notebook_accepts():
    """`make demo`'s papermill -y YAML reaches the notebook as a dict of valid TrainConfig overrides (a tab from a
    wrapped Makefile line once broke it)."""
    import shlex
    import subprocess

    import yaml

    from config import TrainConfig, check_config
    dry = subprocess.run(["make", "-n", "-o", ".venv/.installed", "-o", "demo-data", "train-demo", "DEMO_EPOCHS=3"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    line = next(line for line in dry.splitlines() if "papermill" in line)
    argv = shlex.split(line)
    settings = yaml.safe_load(argv[argv.index("-y") + 1])["SETTINGS"]
    cfg = TrainConfig(**settings)
    check_config(cfg)
    assert (cfg.data, cfg.epochs, cfg.pretrained, cfg.max_train) == ("demo_data/patches", 3, False, 320)
