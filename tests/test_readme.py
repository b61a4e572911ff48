"""The README's example runs as written and its API table covers the whole API."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

import torchsven

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_example_runs():
    block = README.split("<!-- example:start -->")[1].split("<!-- example:end -->")[0]
    code = block.split("```python")[1].split("```")[0]
    assert len(code.strip().splitlines()) <= 20
    exec(compile(code, "README.md", "exec"), {})


def _documented_names() -> set[str]:
    """Names in the first column of the README's tables (`name` cells)."""
    return set(re.findall(r"^\|\s*`([A-Za-z_][A-Za-z0-9_]*)`", README, flags=re.M))


def test_readme_sections_are_in_sync_with_docs():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import sync_readme
    finally:
        sys.path.pop(0)
    assert sync_readme.rendered(README) == README, "run python tools/sync_readme.py"


def test_readme_api_table_covers_every_argument_and_field():
    documented = _documented_names()
    arguments = [
        name for name in inspect.signature(torchsven.Sven.__init__).parameters if name != "self"
    ]
    fields = [f.name for f in dataclasses.fields(torchsven.StepInfo)]
    missing = [name for name in arguments + fields if name not in documented]
    assert not missing, f"README API tables miss: {missing}"
