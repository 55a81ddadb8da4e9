"""The cost of find_gates' search over every single image-side position, in forwards.

Model: a random Chameleon (default 8 decoder layers, hidden 256, 8 heads) whose VQ
tokenizer turns a 64 px image into a 16 x 16 = 256-token grid; with BOI, EOI and ~30
words of text after the image one example is ~290 tokens. Batch: 4 examples.

Pass 1 of ``find_gates`` (what covers every single position) runs, per batch: the task's
clean forward, one forward with gradients and its backward, and one forward per distinct
position class, ``3 + n_classes`` passes. The script times pass 1 (``cost["seconds"]``:
clean + gradient + classes) against one forward timed just before it (the median of
three; a shared machine drifts), with and without the per-row classes, and prints the
median ratio over ``--reps`` searches next to the pass count. Two units: a plain forward
(attention through the fused kernel) and a forward with a read-only hook on every
attention pattern (tl_vlm's eager attention, which every knockout and the gradient pass
take). The checks
(exact knockouts of chosen positions), the layer sweep and the neighbourhood overlap are
extra passes that the ratio leaves out.

Run: ``.venv/bin/python benchmarks/find_gates_cost.py [--layers 8] [--hidden 256] [--reps 5]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = " ".join(["describe the image a cat"] * 6)   # 30 words after the image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from tests.tiny import image
    from tests.tiny.chameleon import build as build_chameleon
    from tl_vlm import HookedVLM, analyses as A
    from tl_vlm.tasks import Example, NextTokenTask

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        build_chameleon(Path(tmp), layers=args.layers, hidden=args.hidden, heads=8,
                        image_size=args.image_size)
        model = HookedVLM.from_pretrained(tmp, device=args.device)
    n = args.batch * args.batches
    task = NextTokenTask("bench", [Example(TEXT, images=(image(i, (args.image_size,) * 2),),
                                           answers=("cat",)) for i in range(n)])
    batch = task.prepare(model, task.examples[:args.batch])
    seq = batch.input_ids.shape[1]
    print(f"Chameleon, {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"{args.batches} batches of {args.batch} x {seq} tokens "
          f"({(args.image_size // 4) ** 2} image tokens), device {args.device}, "
          f"{torch.get_num_threads()} thread(s)")

    def sync() -> None:
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()

    # Every pass of the search edits or reads the attention pattern, which takes tl_vlm's
    # eager attention; a plain forward takes the fused kernel. Both are timed as units.
    pattern_read = [(f"blocks.{l}.attn.hook_pattern", lambda pattern, hook: None)
                    for l in range(model.cfg.n_layers)]

    def forward_seconds(hooks) -> float:
        """Median of three forwards (timed next to each search: the machine drifts)."""
        times = []
        with torch.no_grad():
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                model.run_with_hooks(batch, fwd_hooks=hooks)
                sync()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    forward_seconds([])                                  # warm-up
    for rows in (False, True):
        ratios: dict[str, list[float]] = {"plain": [], "eager": []}
        units: dict[str, list[float]] = {"plain": [], "eager": []}
        for _ in range(args.reps):
            units["plain"].append(forward_seconds([]))
            units["eager"].append(forward_seconds(pattern_read))
            gates = A.find_gates(model, task, batch_size=args.batch, rows=rows, check_top=1,
                                 check_random=0, layer_sweep=False, overlap=False)
            seconds = sum(gates.cost["seconds"].values()) / gates.cost["batches"]
            for unit in ratios:
                ratios[unit].append(seconds / units[unit][-1])
        cost = gates.cost
        shown = "; ".join(
            f"{statistics.median(ratios[u]):.1f} x a {u} forward ({statistics.median(units[u]) * 1e3:.0f} ms, "
            f"range {min(ratios[u]):.1f}-{max(ratios[u]):.1f})" for u in ratios)
        print(f"rows={str(rows):5}: {cost['n_classes']} classes -> {cost['passes_per_batch']} "
              f"passes per batch; measured (median of {args.reps}) {shown}; seconds per "
              f"phase, last run: {cost['seconds']}")


if __name__ == "__main__":
    main()
