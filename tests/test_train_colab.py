"""colabs/train_uea.ipynb runs top to bottom as shipped (CPU budget, real SCP1 files)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "colabs" / "train_uea.ipynb"


def test_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_colab_runs_as_shipped(tmp_path, monkeypatch, shared_data_dir):
    scp1 = shared_data_dir / "uea" / "SelfRegulationSCP1"
    if not scp1.is_dir():
        pytest.skip(f"SelfRegulationSCP1 not found at {scp1}")
    from ipykernel import kernelspec

    kernelspec.install(prefix=str(tmp_path / "jupyter"), kernel_name="python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.delenv("FLAX_LINOSS_COLAB_SMALL", raising=False)
    monkeypatch.setenv("FLAX_LINOSS_REPO", str(REPO))
    # A data directory whose manual folder holds the raw SCP1 files.
    manual = tmp_path / "data" / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "uea").symlink_to(shared_data_dir / "uea")
    monkeypatch.setenv("FLAX_LINOSS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=900,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    text = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "local devices: 2" in text
    assert ("steps/s" in text or "s/step" in text) and "Final: test accuracy" in text
    assert "Resumed from" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert (tmp_path / "runs" / "scp1-linoss-im" / "checkpoints").is_dir()
    assert "model.hidden_size = 128" in text  # the paper's config, as shipped
