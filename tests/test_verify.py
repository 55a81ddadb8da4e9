"""`tl-vlm verify-checkpoint` on tiny local checkpoints (CPU): every check, the record row."""

import pytest

from tl_vlm.study.verify import main, verify_checkpoint


@pytest.mark.parametrize("name, dtype", [("qwen2_vl", "bfloat16"), ("pixtral", "float32"),
                                          ("emu3", "float32")])
def test_a_good_checkpoint_passes_and_is_recorded(tiny_zoo, tmp_path, name, dtype):
    record = tmp_path / "verified.md"
    report = verify_checkpoint(str(tiny_zoo.path(name)), dtype=dtype, record=record)
    assert report.passed, report.lines()
    assert set(report.checks) >= {"parity with Hugging Face", "hooks live", "every hook fires",
                                  "the image reaches the prediction"}
    rows = [line for line in record.read_text().splitlines() if name in line]
    assert len(rows) == 1 and f"| {dtype} |" in rows[0] and "| yes |" in rows[0]


def test_a_wrong_layout_fails_the_positions_check(tiny_zoo, tmp_path, monkeypatch):
    from tl_vlm.adapters.qwen2_vl import Qwen2VLLayout

    monkeypatch.setattr(Qwen2VLLayout, "processor_counted", ("image", "boi"))
    report = verify_checkpoint(str(tiny_zoo.path("qwen2_vl")), dtype="float32",
                               record=tmp_path / "verified.md")
    assert report.checks["positions agree with the processor"] is False and not report.passed
    assert "MISMATCH" in (tmp_path / "verified.md").read_text()


def test_command_line_exit_status(tiny_zoo, tmp_path, capsys):
    assert main([str(tiny_zoo.path("llava")), "--dtype", "float32",
                 "--record", str(tmp_path / "v.md")]) == 0
    out = capsys.readouterr().out
    assert "PASS  parity with Hugging Face" in out and "PASS  hooks live" in out
