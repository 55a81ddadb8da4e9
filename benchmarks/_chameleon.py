"""What the small-Chameleon benchmarks share: their arguments and the random model.

A random Chameleon (8 heads) whose VQ tokenizer turns an ``--image-size`` px image into
an (image-size / 4)^2-token grid, saved and loaded through ``HookedVLM.from_pretrained``,
offline; ``TEXT`` is the ~30 words that follow the image.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = " ".join(["describe the image a cat"] * 6)   # 30 words after the image


def parser(description: str, layers: int, hidden: int) -> argparse.ArgumentParser:
    """The options every such benchmark takes (add its own before parsing)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    return p


def random_chameleon(args: argparse.Namespace):
    """Quiet warnings, set the threads, build and load the random model."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from tests.tiny.chameleon import build as build_chameleon
    from tl_vlm import HookedVLM

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        build_chameleon(Path(tmp), layers=args.layers, hidden=args.hidden, heads=8,
                        image_size=args.image_size)
        return HookedVLM.from_pretrained(tmp, device=args.device)
