"""colabs/train_uea.ipynb ships with the outputs of a run and runs top to bottom (real SCP1
files)."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "colabs" / "train_uea.ipynb"


def _text(nb):
    return "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


def test_notebook_ships_with_a_runs_outputs_and_installs_as_the_readme_does():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # one run
    outputs = [o for c in code for o in c.outputs]
    assert not any(o.output_type == "error" for o in outputs)
    text = _text(nb)
    assert "model.hidden_size = 128" in text and "Preparing uea/SelfRegulationSCP1 from" in text
    assert "Final: test accuracy" in text and "Resumed from" in text and "Checkpoint step" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
    install = code[0].source
    assert "github.com" not in install and "git clone" not in install
    assert '"pip", "install"' in install and '[train]"' in install  # from a checkout


def test_colab_runs_top_to_bottom(tmp_path, monkeypatch, shared_data_dir):
    """Every cell on the real SCP1 files, at the notebook's own smaller size
    (``FLAX_LINOSS_COLAB_SMALL=1``: a narrower model, the same code and steps); the shipped
    outputs are the papers' config (checked above)."""
    scp1 = shared_data_dir / "uea" / "SelfRegulationSCP1"
    if not scp1.is_dir():
        pytest.skip(f"SelfRegulationSCP1 not found at {scp1}")
    from ipykernel import kernelspec

    kernelspec.install(prefix=str(tmp_path / "jupyter"), kernel_name="python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("FLAX_LINOSS_COLAB_SMALL", "1")
    monkeypatch.setenv("FLAX_LINOSS_REPO", str(REPO))
    # A data directory whose manual folder holds the raw SCP1 files.
    manual = tmp_path / "data" / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "uea").symlink_to(shared_data_dir / "uea")
    monkeypatch.setenv("FLAX_LINOSS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=2")
    monkeypatch.setenv("XLA_FLAGS", flags)  # two devices, the suite's quicker compiles
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=900,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    text = _text(nb)
    assert "local devices: 2" in text
    assert ("steps/s" in text or "s/step" in text) and "Final: test accuracy" in text
    assert "Resumed from" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert (tmp_path / "runs" / "scp1-linoss-im-small" / "checkpoints").is_dir()
    assert "SelfRegulationSCP1" in text and "model.hidden_size = 8" in text
