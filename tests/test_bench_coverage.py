"""Every benchmark script has a ``--quick`` mode, and a test runs it.

The quick runs themselves are in tests/test_benchmarks.py and tests/test_bench_quick_protocol.py
(each calls its script by file name with ``--quick``); this test fails when a script is added
to benchmarks/ without either. Modules whose names start with ``_`` are helpers, not scripts.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_benchmark_script_has_a_quick_run_in_the_tests() -> None:
    scripts = sorted(p for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    assert scripts, "no benchmark scripts found"
    tests = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py")
                      if p.name != Path(__file__).name)
    missing_flag = [p.name for p in scripts if not re.search(
        r"""add_argument\(\s*["']--quick["']""", p.read_text())]
    untested = [p.name for p in scripts if f'"{p.name}"' not in tests]
    assert not missing_flag, f"benchmarks without a --quick option: {missing_flag}"
    assert not untested, f"benchmarks whose --quick run no test starts: {untested}"
