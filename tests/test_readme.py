"""Every Python block of the README runs as written (each in a fresh namespace)."""

import pathlib
import re
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_code_blocks():
    assert len(BLOCKS) >= 6


def _gemma_example(monkeypatch) -> dict:
    """Blocks written for flax's ``examples/gemma`` folder (``import modules``, ``import
    transformer``, a ``config``) run on its stand-in, ``tests/gemma_style``."""
    from gemma_style import modules, transformer
    from gemma_style.transformer_cfg import TransformerConfig

    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "transformer", transformer)
    return {"config": TransformerConfig.tiny()}


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, capsys, monkeypatch):
    code = BLOCKS[index]
    namespace = {"__name__": f"readme_{index}"}
    if "import modules\nimport transformer\n" in code:
        namespace.update(_gemma_example(monkeypatch))
    exec(compile(code, f"README.md block {index}", "exec"), namespace)
    assert capsys.readouterr().out.strip()  # every block prints what it made
