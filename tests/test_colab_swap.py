"""colabs/swap_into_transformer.ipynb ships with the outputs of a run and runs top to bottom as
shipped.

The notebook trains a small Flax transformer with attention and with LinOSS (registry name
and swap_attention), plots the curves and checks cached decoding against the full forward
pass (an ``assert`` in the notebook). The kernel is this interpreter: a ``python3``
kernelspec pointing at ``sys.executable`` is installed in a temporary directory.
"""

from __future__ import annotations

import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "colabs" / "swap_into_transformer.ipynb"


def test_committed_notebook_ships_with_a_runs_outputs_and_installs_as_the_readme_does():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # one run
    outputs = [o for c in code for o in c.outputs]
    assert not any(o.output_type == "error" for o in outputs)
    printed = "".join(o.get("text", "") for o in outputs)
    assert "max |decode - full|" in printed and "swapped d-linoss loss" in printed
    assert any("image/png" in o.get("data", {}) for o in outputs)
    install = code[0].source
    assert "github.com" not in install and "git+" not in install
    assert '"pip", "install"' in install and '[train]"' in install  # a checkout or a wheel


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """Every cell, at the notebook's own smaller size (``FLAX_LINOSS_COLAB_SMALL=1``: fewer
    steps, a narrower model, the same code); the shipped outputs are a full-size run
    (checked above)."""
    kernelspec.install(prefix=str(tmp_path / "jupyter"), kernel_name="python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("FLAX_LINOSS_COLAB_SMALL", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    printed = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert f"python: {sys.executable}" in printed
    assert "max |decode - full|" in printed and "swapped d-linoss loss" in printed
    assert any(
        out.get("output_type") == "display_data" and "image/png" in out.get("data", {})
        for cell in nb.cells
        for out in cell.get("outputs", [])
    ), "the loss plot was not drawn"
