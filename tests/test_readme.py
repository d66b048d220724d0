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


def test_the_sequence_parallel_example_runs_without_kernels(monkeypatch, capsys):
    # FLAX_LINOSS_KERNELS=0: "auto" takes the pure-JAX adjoint loop inside shard_map.
    (code,) = [b for b in BLOCKS if 'sequence_axis="seq"' in b]
    monkeypatch.setenv("FLAX_LINOSS_KERNELS", "0")
    exec(compile(code, "README.md sequence-parallel block", "exec"), {"__name__": "readme_seq"})
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) < 1e-4
