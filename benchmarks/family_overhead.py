"""Every family's cost against Hugging Face's SDPA forward: an unhooked forward and a gate
knockout, in peak activation memory and in time, on the family's tiny model.

For each family of ``tests/tiny`` (or ``--families a,b``): the tiny checkpoint is built and
loaded twice, as tl_vlm's ``HookedVLM`` and as the Hugging Face class with
``attn_implementation="sdpa"``; the spec's padded batch (two prompts, images) runs
through

- ``hf``: the HF model's forward (the reference);
- ``forward``: ``model(batch)``, no hook;
- ``knockout``: ``model.run_with_hooks(batch, fwd_hooks=...)`` cutting every query's
  attention to the gate (EOI; for a family without one, to the last image token) in every
  layer, the paper's post-softmax zero.

**Memory** is the peak of live tensor bytes during the call, counted by a torch dispatch
mode: every tensor an operator returns adds its storage's bytes once (views share them)
and gives them back when the last tensor on that storage is freed. Parameters and inputs
exist before the call and are not counted. The count does not depend on the allocator
or on what other processes do, so it is exact on a shared 2-core machine and on tiny
models (RSS is not: glibc keeps small blocks). **Time** is the median of ``--reps``
interleaved calls; at tiny width it measures Python overhead per hook (TransformerLens'
hook points, tl_vlm's attention function), not the attention itself, so the time ratios
here are an upper bound of what a real-width model shows (``benchmarks/real_scale.py``).

Run: ``.venv/bin/python benchmarks/family_overhead.py [--families llava,gemma3] [--reps 15]``;
``--markdown`` prints the table for ``benchmarks/results/family_overhead.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEMORY_TARGET, TIME_TARGET = 1.02, 1.10


def peak_live_bytes(fn) -> int:
    """The peak of live tensor-storage bytes while ``fn()`` runs (see the module doc)."""
    import torch
    from torch.utils._pytree import tree_flatten

    from tl_vlm.core.compat import torch_dispatch_mode

    class Counter(torch_dispatch_mode()):
        def __init__(self) -> None:
            super().__init__()
            self.refs: dict[int, int] = {}
            self.size: dict[int, int] = {}
            self.current = self.peak = 0

        def _free(self, key: int) -> None:
            self.refs[key] -= 1
            if self.refs[key] == 0:
                self.current -= self.size.pop(key)
                del self.refs[key]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    key = t.untyped_storage().data_ptr()
                    if not key:
                        continue
                    if key not in self.refs:
                        self.refs[key] = 0
                        self.size[key] = t.untyped_storage().nbytes()
                        self.current += self.size[key]
                        self.peak = max(self.peak, self.current)
                    self.refs[key] += 1
                    weakref.finalize(t, self._free, key)
            return out

    with torch.no_grad():
        counter = Counter()
        with counter:
            result = fn()
        del result
    return counter.peak


def median_seconds(fns: dict, reps: int) -> dict[str, float]:
    """Median wall time of each callable, calls interleaved so drift hits all alike."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()                                   # warm-up
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(family: str, reps: int) -> dict:
    import torch
    import transformers

    from tests.tiny import specs, tiny_checkpoint
    from tl_vlm import HookedVLM
    from tl_vlm import analyses as A

    spec = specs()[family]
    module = sys.modules[spec.build.__module__]
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_checkpoint(module, tmp)
        model = HookedVLM.from_pretrained(path)
        hf = getattr(transformers, spec.hf_class).from_pretrained(
            path, attn_implementation="sdpa", dtype=torch.float32).eval()
    batch = model.prepare(spec.prompts, images=spec.images)
    pos = batch.positions
    keys, target = (pos.gate, "gate") if not pos.gate.is_empty() else (pos.last_image, "last image")
    hooks = A.knockout_hooks(model, batch, keys=keys)
    hf_inputs = {k: v for k, v in batch.inputs.items()}
    calls = {
        "hf": lambda: hf(**hf_inputs),
        "forward": lambda: model(batch),
        "knockout": lambda: model.run_with_hooks(batch, fwd_hooks=hooks),
    }
    memory = {name: peak_live_bytes(fn) for name, fn in calls.items()}
    seconds = median_seconds(calls, reps)
    return {"family": family, "tokens": tuple(batch.input_ids.shape), "target": target,
            "memory": memory, "seconds": seconds}


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=None, help="comma-separated (default: all)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from tests.tiny import specs

    names = args.families.split(",") if args.families else sorted(specs())
    rows = []
    for name in names:
        r = measure(name, args.reps)
        m, s = r["memory"], r["seconds"]
        ratios = (m["forward"] / m["hf"], m["knockout"] / m["hf"],
                  s["forward"] / s["hf"], s["knockout"] / s["hf"])
        rows.append((name, r["tokens"], r["target"], m["hf"], ratios))
        if not args.markdown:
            print(f"{name:16s} batch {r['tokens']}, knockout of the {r['target']}: memory "
                  f"{m['hf'] / 2**10:.0f} KiB (hf) x{ratios[0]:.3f} forward x{ratios[1]:.3f} "
                  f"knockout; time {s['hf'] * 1e3:.1f} ms (hf) x{ratios[2]:.2f} forward "
                  f"x{ratios[3]:.2f} knockout", flush=True)
    if args.markdown:
        print("| family | batch x tokens | knocked out | HF peak (KiB) | memory: forward | "
              "memory: knockout | time: forward | time: knockout |")
        print("|---|---|---|---|---|---|---|---|")
        for name, tokens, target, hf_bytes, r in rows:
            print(f"| {name} | {tokens[0]} x {tokens[1]} | {target} | {hf_bytes / 2**10:.0f} | "
                  f"{r[0]:.3f} | {r[1]:.3f} | {r[2]:.2f} | {r[3]:.2f} |")
    over = [name for name, *_, r in rows if max(r[:2]) > MEMORY_TARGET]
    print(f"\nmemory over {MEMORY_TARGET}x HF sdpa: {over or 'none'}; time ratios at tiny width "
          f"are Python overhead per hook (target {TIME_TARGET}x is meant at real width)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
