"""The study report's page: header (version, date, total compute time), one drawing per
figure from tl_vlm.plot, tight titled figures."""

from __future__ import annotations

import json
import re

import tl_vlm
from tl_vlm.study.report import write_report

RESULTS = {
    "accuracy": {"conditions": {"none": {"mean": 1.0, "n": 8}, "gate": {"mean": 0.25, "n": 8}},
                 "chance": 0.25},
    "contribution": {"groups": ["image", "eoi"], "layers": [0, 1],
                     "weight": [[0.2, 0.8], [0.1, 0.9]], "value": [[0.1, 0.9], [0.0, 1.0]],
                     "grid_map": [[1.6e-7, 2e-7], [3e-7, 4e-7]], "map_layers": "1-1"},
}


def test_header_names_version_date_and_total_compute_time(tmp_path):
    path = write_report(RESULTS, tmp_path, meta={"model": "toy-gated", "compute_seconds": 95.3})
    page = path.read_text()
    assert f"tl_vlm {tl_vlm.__version__}" in page
    assert re.search(r"written \d{4}-\d{2}-\d{2} \d{2}:\d{2}", page)
    assert "compute time (all runs of this report, resumes included)</td><td>1 min 35 s" in page
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tl_vlm"] == tl_vlm.__version__ and saved["meta"]["compute_seconds"] == 95.3


def test_figures_come_from_tl_vlm_plot(tmp_path):
    page = write_report(RESULTS, tmp_path).read_text()
    # accuracy bars, contribution shares, contribution map: three drawings
    assert page.count("Plotly.newPlot") == 3 and "<script src" not in page
    # colour bars are titled and never use SI suffixes
    assert '"colorbar":{"title":{"text":"share"},"exponentformat":"e"' in page.replace(" ", "")
