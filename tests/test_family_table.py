"""The supported-families table and its record are generated from the tests, and current."""

from tests.family_record import RECORD, MARKERS, ROOT, compute_record, record_text


def test_the_record_is_what_the_tests_verify():
    assert RECORD.read_text() == record_text(compute_record()), (
        "tl_vlm/core/verified_families.json is stale: run python scripts/families_table.py --write")


def test_readme_and_docs_show_the_generated_table():
    from tl_vlm import families

    table = families().to_markdown()
    for doc in ("README.md", "docs/families.md"):
        text = (ROOT / doc).read_text()
        start, end = MARKERS
        assert start in text and end in text, f"{doc}: the families-table markers are missing"
        shown = text.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"
        assert shown == table, f"{doc}: stale table: run python scripts/families_table.py --write"


def test_every_family_is_tested_on_a_tiny_model_and_at_real_size():
    record = compute_record()
    assert all(r["tiny_exact"] and r["real_size"] for r in record.values()), record


def test_the_table_shows_in_a_notebook_and_as_text():
    from tl_vlm import families

    table = families()
    assert "<table>" in table._repr_html_() and "llava" in repr(table).lower()
    assert len(table.rows()) == len(table)
