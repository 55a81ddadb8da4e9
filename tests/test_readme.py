"""The README's runnable quickstart runs as written (the block after the marker)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- the tests run the next block -->"


def _marked_blocks() -> list[str]:
    text = README.read_text()
    return [m.group(1) for m in re.finditer(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, re.S)]


def test_readme_quickstart_runs():
    blocks = _marked_blocks()
    assert blocks, f"no block after {MARKER!r} in the README"
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)
        assert namespace["fig"].data, "the quickstart's figure has no trace"
        assert namespace["knocked"].shape[0] == 2
