"""The suite's own scheduling: the files tests/conftest.py runs first exist (a renamed file would silently
lose its place), and run.sh test keeps that order (pytest-xdist's reorder off)."""
from pathlib import Path

from conftest import LONGEST_FIRST

ROOT = Path(__file__).resolve().parents[2]


def test_the_files_run_first_exist_and_run_sh_keeps_their_order():
    assert [f for f in LONGEST_FIRST if not (ROOT / f).is_file()] == []
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    test_line = next(line for line in (ROOT / "run.sh").read_text().splitlines() if line.lstrip().startswith("test)"))
    assert "--dist loadfile" in test_line and "--no-loadscope-reorder" in test_line
