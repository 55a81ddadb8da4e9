"""Write what the tests verify per family (``tl_vlm/core/verified_families.json``) and the
supported-families table it makes (README.md, docs/families.md).

    python scripts/families_table.py --write     # after adding a family or a verified row
    python scripts/families_table.py             # print the table

``tests/test_family_table.py`` fails when the file or a table is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> int:
    import tl_vlm.core.family as family
    from tests.family_record import RECORD, compute_record, record_text, with_table

    if "--write" not in argv:
        print(family.families().to_markdown(), end="")
        return 0
    RECORD.write_text(record_text(compute_record()))
    family._VERIFIED = None                      # read the new record
    table = family.families().to_markdown()
    for doc in (ROOT / "README.md", ROOT / "docs" / "families.md"):
        doc.write_text(with_table(doc.read_text(), table))
        print(f"wrote {doc.relative_to(ROOT)}")
    print(f"wrote {RECORD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
