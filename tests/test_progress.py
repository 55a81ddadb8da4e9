"""Progress reports: plain lines in logs, nothing when disabled; no warnings in the analyses."""

import warnings

import torch

from tl_vlm import analyses as A
from tl_vlm.core.progress import progress


def test_logs_get_plain_lines(capsys):
    assert list(progress(range(20), desc="demo")) == list(range(20))   # stderr is not a tty here
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("[demo] 2/20 batches (10%)") and "left" in lines[0]
    assert lines[-1].startswith("[demo] 20/20 batches (100%)") and "left" not in lines[-1]
    assert len(lines) == 10
    list(progress(range(20), desc="quiet", enabled=False))
    list(progress([1], desc="one step"))
    assert capsys.readouterr().err == ""


def test_notebook_without_widgets_gets_a_text_bar(monkeypatch):
    import sys
    import types

    from tqdm.std import tqdm

    shell = type("ZMQInteractiveShell", (), {})()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    monkeypatch.setitem(sys.modules, "ipywidgets", None)      # not installed
    bar = progress(range(3), desc="nb")
    assert type(bar) is tqdm
    bar.close()
    from transformers.utils import logging as hf_logging

    from tl_vlm.core.progress import quiet_hub_bars_in_bare_notebooks

    was_on = hf_logging.is_progress_bar_enabled()   # other tests may have turned them off
    hf_logging.enable_progress_bar()
    try:
        with quiet_hub_bars_in_bare_notebooks():   # no "IProgress not found" while loading
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()
    finally:
        if not was_on:
            hf_logging.disable_progress_bar()


@torch.no_grad()
def test_the_analyses_run_without_warnings(toy_models):
    from tl_vlm.toy import make_examples

    model = toy_models["toy-gated"]
    data = make_examples(48, seed=3)
    batches = [model.prepare(data.prompts[i:i + 24], padding_side="left") for i in (0, 24)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.cross_modal_contribution(model, iter(batches), show_progress=False)
        A.modality_separation(model, batches, show_progress=False)
        A.neighbourhood_overlaps(model, batches, data.labels, k=5, show_progress=False)
        model.generate(batches[0], max_new_tokens=2, fwd_hooks=A.gate_knockout(model, batches[0]))


def test_no_iprogress_warning_without_widgets(monkeypatch):
    import sys
    import warnings

    from tl_vlm.core.progress import quiet_tqdm_widget_warning

    monkeypatch.setitem(sys.modules, "ipywidgets", None)      # not installed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_tqdm_widget_warning()
        warnings.warn("IProgress not found. Please update jupyter and ipywidgets.")
        warnings.warn("something else")
    assert [str(w.message) for w in caught] == ["something else"]
