"""The digits example: both frameworks, every registered target and mode, one table.

It runs the example as a user would (``python -m examples.digits.run``) and checks its rows
against the converter registry, so a new backend without an example row fails here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from converters import supported_pairs

REPO = Path(__file__).resolve().parents[1]


def test_digits_example_converts_every_pair(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "examples.digits.run", "--out", str(tmp_path),
                           "--json"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout)
    assert not [r for r in rows if "error" in r]
    covered = {(r["source"], r["target"], r["mode"].split("/")[0]) for r in rows}
    expected = {p for p in supported_pairs() if p[0] in ("pytorch", "keras")}
    assert covered == expected
    for row in rows:
        assert row["accuracy"] > 0.9, row
        assert row["drop_points"] <= 1.0, row
        assert (tmp_path / f"{row['source']}-{row['target']}-{row['mode'].replace('/', '-')}"
                ".edgepkg").exists()
    fp32 = {(r["source"], r["target"]): r["size_kib"] for r in rows if r["mode"] == "none"}
    for row in rows:
        if row["mode"].startswith(("int8", "dynamic")):
            assert row["size_kib"] < 0.4 * fp32[(row["source"], row["target"])], row
