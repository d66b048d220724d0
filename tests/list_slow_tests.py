"""Writes ``tests/slow_tests.txt``: the tests that a timed run measured at ``--seconds`` or
more (setup and call together), which ``conftest.py`` marks ``slow`` (out of the fast
subset ``-m "not slow"``; CI runs them all).

    python -m pytest -q -n 2 --durations=0 > durations.txt
    python tests/list_slow_tests.py durations.txt --seconds 2.2

Tests marked ``slow`` in their own file stay so whatever this list says.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re

HERE = pathlib.Path(__file__).resolve().parent
LINE = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S+)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("durations", help="the output of a pytest run with --durations=0")
    parser.add_argument("--seconds", type=float, default=2.2)
    args = parser.parse_args(argv)
    total = collections.Counter()
    for line in open(args.durations):
        m = LINE.match(line)
        if m:
            total[m.group(3)] += float(m.group(1))
    slow = sorted(node for node, s in total.items() if s >= args.seconds)
    header = [
        f"# Tests measured at {args.seconds:g} s or more (setup + call) with `pytest -n 2`;",
        "# conftest.py marks them slow. Regenerate with tests/list_slow_tests.py.",
    ]
    (HERE / "slow_tests.txt").write_text("\n".join([*header, *slow]) + "\n")
    print(f"{len(slow)} of {len(total)} timed tests listed as slow")


if __name__ == "__main__":
    main()
