"""The planted-bug list stays in step with the source: each bug's old text is there exactly once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("planted_bugs", REPO / "tools" / "planted_bugs.py")
assert _spec and _spec.loader
planted = importlib.util.module_from_spec(_spec)
sys.modules["planted_bugs"] = planted  # dataclasses look their module up there
_spec.loader.exec_module(planted)


@pytest.mark.parametrize("bug", planted.BUGS, ids=lambda b: b.name)
def test_each_bug_applies_exactly_once(bug) -> None:
    planted.check_applies(bug)
    for test in bug.tests:
        assert (REPO / test.split("::")[0]).is_file(), test


def test_stale_bug_is_reported(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("x = 1\nx = 1\n")
    bug = planted.Bug("dup", "m.py", "x = 1", "x = 2", ())
    with pytest.raises(ValueError, match="2 times"):
        planted.check_applies(bug, tmp_path)
    bug = planted.Bug("gone", "m.py", "y = 1", "y = 2", ())
    with pytest.raises(ValueError, match="0 times"):
        planted.check_applies(bug, tmp_path)
