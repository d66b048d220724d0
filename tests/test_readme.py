"""Every Python block of the README runs as written (each in a fresh namespace)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_code_blocks():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, capsys):
    code = BLOCKS[index]
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": f"readme_{index}"})
    assert capsys.readouterr().out.strip()  # every block prints what it made
