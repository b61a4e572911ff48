"""Copy the feature sections in docs/readme/ into README.md, between markers.

Each feature keeps its README section in docs/readme/<feature>.md (tables,
measured numbers); README.md holds them verbatim between
``<!-- sections:start -->`` and ``<!-- sections:end -->``, in ORDER.
``python tools/sync_readme.py`` rewrites that part; ``--check`` exits 1 when
README.md is out of date (the test suite runs the check).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["factored", "bench", "pinn", "robust", "least_squares", "options", "distributed"]
START, END = "<!-- sections:start -->", "<!-- sections:end -->"


def rendered(readme: str) -> str:
    """README text with the sections region rebuilt from docs/readme/."""
    docs = ROOT / "docs" / "readme"
    names = ORDER + sorted(p.stem for p in docs.glob("*.md") if p.stem not in ORDER)
    parts = [
        (docs / f"{name}.md").read_text().strip()
        for name in names
        if (docs / f"{name}.md").exists()
    ]
    head, rest = readme.split(START, 1)
    tail = rest.split(END, 1)[1]
    return head + START + "\n\n" + "\n\n".join(parts) + "\n\n" + END + tail


def main(argv: list[str]) -> int:
    path = ROOT / "README.md"
    current = path.read_text()
    wanted = rendered(current)
    if "--check" in argv:
        if current != wanted:
            print("README.md is out of date: run python tools/sync_readme.py")
            return 1
        return 0
    path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
