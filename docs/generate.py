"""Rewrite the docs' generated blocks from the code: ``python docs/generate.py``.

- docs/usage.md, between ``<!-- options: generated -->`` and ``<!-- options: end -->``:
  every compressor's options (:func:`glp.methods.options_markdown`);
- docs/methods.md, between ``<!-- settings: NAME -->`` and ``<!-- settings: end -->``: each
  method's settings beside its reference's (:func:`glp.methods.settings_markdown`).

tests/test_docs_options.py fails while a block differs from what this writes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def blocks() -> dict[Path, dict[str, str]]:
    """Each doc's generated blocks by their opening marker."""
    from glp.methods import compressors, options_markdown, settings_markdown

    return {ROOT / "docs" / "usage.md": {"<!-- options: generated -->": options_markdown()},
            ROOT / "docs" / "methods.md": {f"<!-- settings: {m.name} -->": settings_markdown(m)
                                           for m in compressors()}}


def replace(text: str, opening: str, body: str) -> str:
    """``text`` with the block after ``opening`` (up to the next ``<!-- ...: end -->``)
    replaced by ``body``; a missing block is an error."""
    pattern = re.compile(re.escape(opening) + r"\n.*?(<!-- \w+: end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no block {opening} ... <!-- ...: end --> to fill")
    return pattern.sub(lambda m: f"{opening}\n{body.strip()}\n{m.group(1)}", text, count=1)


def block(text: str, opening: str) -> str | None:
    """The generated block after ``opening`` in ``text`` (None when there is none)."""
    found = re.search(re.escape(opening) + r"\n(.*?)<!-- \w+: end -->", text, re.S)
    return found.group(1).strip() if found else None


def main() -> int:
    for path, found in blocks().items():
        text = path.read_text()
        for opening, body in found.items():
            text = replace(text, opening, body)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
