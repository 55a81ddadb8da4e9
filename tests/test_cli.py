"""The command line: every bad flag is one line, fast, before anything is loaded; help;
Ctrl-C; shards from the environment; each torchrun rank's device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tl_vlm.cli import commands as cli
from tl_vlm.cli import options
from tl_vlm.study.config import Placement, StudyConfigError

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import sys
from tl_vlm.cli import commands as cli
try:
    rc = cli.main(sys.argv[1:])
except SystemExit as exit:      # argparse's own errors
    rc = exit.code
heavy = [m for m in ("torch", "transformers", "transformer_lens", "datasets") if m in sys.modules]
print("RESULT", rc, ",".join(heavy) or "-")
"""

BAD_FLAGS = [
    (["--patch-layers", "0:99"], "asks for layer(s) [4, 5, 6, 7, 8, ...], but toy-gated has 4 layers"),
    (["--patch-layers", "2:1"], "'2:1' selects no layer"),
    (["--geometry-layers", "3,9"], "--geometry-layers asks for layer(s) [9]"),
    (["--n-examples", "0"], "argument --n-examples: must be at least 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--n-pairs", "-3"], "argument --n-pairs: must be at least 1, got -3"),
    (["--model", "toy_gated"], "did you mean the shipped toy model 'toy-gated'?"),
    (["--model", "toy-gatd"], "did you mean the shipped toy model 'toy-gated'?"),
    (["--model", "org/model", "--task", "vqav2"], "org/model: the Hugging Face hub cannot be reached"),
    (["--model", "./checkpoints/missing"], "no checkpoint directory './checkpoints/missing'"),
    (["--model", "org/model"], "--task is required for a model other than the toy models"),
    (["--steps", "acuracy"], "unknown step ['acuracy']; choose from accuracy,"),
    (["--conditions", "gate,eoi"], "unknown condition ['eoi']"),
    (["--task", "gqa"], "unknown task 'gqa': choose from toy, vqav2"),
    (["--task", "missing.jsonl"], "task file 'missing.jsonl' does not exist"),
    (["--task", "vqav2", "--data", "/no/such/dir"], "--data /no/such/dir: no such directory"),
    (["--task", "coco", "--data", ".", "--coco-root", "/no/coco"], "--coco-root /no/coco: not a directory"),
    (["--data", "."], "the toy task has its own data"),
    (["--prompt-style", "chat"], "--prompt-style applies to the dataset tasks"),
    (["--shard", "2/2"], "argument --shard: K must be in 0..1"),
    (["--shard", "half"], "--shard takes K/N (e.g. 0/4) or 'auto'"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--device-map", "map.json"], "argument --device-map: expected auto, balanced"),
    (["--device", "cpu", "--device-map", "auto"], "--device and --device-map together"),
    (["--max-memory", "0=70GiB"], "--max-memory only applies to a split model"),
    (["--device-map", "auto", "--max-memory", "70GiB"], "expected DEVICE=SIZE pairs"),
]
if not Path("/proc/driver/nvidia/version").exists():
    BAD_FLAGS.append((["--device", "cuda"], "--device cuda: CUDA is not available on this machine"))
    BAD_FLAGS.append((["--n-devices", "2"], "--n-devices 2: CUDA is not available"))


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_in_under_two_seconds(flags, message, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.pop("RANK", None), env.pop("SLURM_ARRAY_TASK_ID", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, "narrow-gate", *flags,
                           "--out", str(tmp_path / "out")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - start
    _, rc, heavy = proc.stdout.strip().splitlines()[-1].split()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr
    assert message in lines[0]
    assert rc == "2"
    assert heavy == "-", f"imported {heavy} before rejecting the flag"
    assert wall < 2.0, f"took {wall:.2f} s"
    assert not (tmp_path / "out").exists(), "nothing may be written before the checks pass"


def test_a_processor_without_chat_template_is_refused_before_the_model(tiny_data, tmp_path,
                                                                        capsys, monkeypatch):
    from tl_vlm import HookedVLM

    monkeypatch.setattr(HookedVLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    rc = cli.main(["narrow-gate", "--task", "vqav2", "--data", str(tiny_data.path("vqav2")),
                   "--prompt-style", "chat", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "needs the checkpoint's chat template" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import tl_vlm.study.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tl_vlm.study.runner, "run_study", interrupted)
    rc = cli.main(["narrow-gate", "--n-examples", "4", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 130
    assert "interrupted" in err and "run the same command again to resume" in err
    assert "Traceback" not in err


def _actions(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((name, a) for a in sub._actions)


def test_help_has_a_description_examples_and_every_flag_explained():
    parser = cli.build_parser()
    top = parser.format_help()
    assert "Narrow Gate study" in top and "examples:" in top and "tl-vlm merge" in top
    for name, action in _actions(parser):
        if action.dest != "help":
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    for name in ("narrow-gate", "table", "merge", "rescore"):
        sub = parser._subparsers._group_actions[0].choices[name]
        for line in sub.format_help().split("\n  -")[1:]:
            flat = " ".join(line.split())
            assert flat.count("default") <= 1, f"{name}: default twice in {flat!r}"
    ng = " ".join(parser._subparsers._group_actions[0].choices["narrow-gate"].format_help().split())
    assert "--batch-size BATCH_SIZE examples per batch; fixes padding" in ng
    assert "(default: 32)" in ng and "(default: none,gate,img_to_text,random)" in ng


def test_shard_auto_reads_slurm_or_torchrun(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert (options.resolve_shard("auto").index, options.resolve_shard("auto").count) == (1, 3)
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    shard = options.resolve_shard("auto")
    assert (shard.index, shard.count) == (1, 2)
    assert "WORLD_SIZE" not in os.environ       # the model loaders must not see it
    monkeypatch.delenv("RANK")
    with pytest.raises(options.CLIError, match="--shard auto found neither"):
        options.resolve_shard("auto")


def test_each_torchrun_rank_takes_its_gpu_or_block(monkeypatch):
    import argparse

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    one = Placement(device=None, n_devices=None)
    assert one.rank_device() == "cuda:1"
    block = Placement(device=None, n_devices=2)
    assert block.rank_device() is None and os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    with pytest.raises(StudyConfigError, match="rank 1 needs GPUs 2..3"):
        block.rank_device()
    assert Placement(device="cpu", n_devices=None).rank_device() == "cpu"


def test_a_model_split_by_a_device_map_gives_the_same_results(tmp_path):
    """--device-map (half the layers offloaded to disk) = one device, byte for byte; the
    placement is logged with the run's compute time, not in the results."""
    from tests.conftest import half_on_disk
    from tl_vlm.toy import toy_model_path

    (tmp_path / "map.json").write_text(json.dumps(half_on_disk(toy_model_path("toy-gated"))))
    common = ["narrow-gate", "--n-examples", "8", "--batch-size", "4",
              "--steps", "accuracy,contribution"]
    assert cli.main(common + ["--out", str(tmp_path / "one")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "split"), "--device-map",
                              str(tmp_path / "map.json"),
                              "--offload-folder", str(tmp_path / "offload")]) == 0
    one, split = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "split"))
    assert one == split
    log = [json.loads(line) for line in (tmp_path / "split" / "compute.jsonl").read_text().splitlines()]
    assert "disk" in log[-1]["placement"]["device_map"].values()
