"""Peak memory: streamed cross-modal contribution vs the same numbers from a full cache.

Model: a 2-layer random Chameleon (hidden 64, 8 heads, 2 kv heads) whose VQ tokenizer
turns a 120 px image into a 30 x 30 = 900-token grid; with BOI, EOI and 90 words of text
after the image, one example is ~1,000 tokens, so one layer's pattern is
8 x 1000 x 1000 float32 = ~32 MB and the model itself is negligible.

Variants, each in a fresh subprocess (so no allocator state carries over):

- ``forward``: plain ``model(batch)`` as booted. TransformerLens boots the HF config with
  ``output_attentions=True``, so HF itself keeps every layer's pattern to the end of
  the pass: this forward already holds all patterns;
- ``forward_lean``: ``model(batch, output_attentions=False)``, the baseline that holds
  one layer's attention temporaries at a time;
- ``streamed``: ``cross_modal_contribution(model, batch)`` (value-weighted; it passes
  ``output_attentions=False``): hooks reduce each pattern to [head, image-side key] sums;
- ``cache``: ``run_with_cache`` keeping only what the computation needs (every layer's
  ``hook_pattern`` and ``hook_v``, with ``output_attentions=False`` so nothing is held
  twice: the most favourable cache), then the *same* accumulator code fed from the
  cached tensors, so both give identical numbers.

How peak memory is measured (CPU): each child loads the model, runs one warm-up forward,
resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), notes its
current RSS, runs the variant once, and reports ``VmHWM - RSS before``: the resident
memory the variant added at its peak. Children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so
glibc serves every large tensor by mmap and returns it to the kernel on free; otherwise
memory kept by the warm-up would be silently reused and the peaks would undercount.
Where clear_refs is unavailable the script falls back to ``ru_maxrss`` minus the RSS
before the run (then including load-time peaks; it says so).

Run: ``.venv/bin/python benchmarks/contribution_memory.py [--layers 2]``; the cache's
extra memory grows with the layer count (all patterns), the streamed one does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 120          # pixels; two VQ downsamplings -> 30 x 30 codes
GRID = IMAGE_SIZE // 4
TEXT = " ".join(["what is this"] * 30)   # 90 text tokens after the image
VARIANTS = ("forward", "forward_lean", "streamed", "cache")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(path: str, variant: str) -> None:
    """Run one variant and print a JSON line with its peak and its per-layer shares."""
    import gc
    import resource

    import torch

    from tests.tiny import image
    from tl_vlm import HookedVLM
    from tl_vlm.analyses.contribution import ContributionAccumulator, cross_modal_contribution

    torch.set_num_threads(1)
    model = HookedVLM.from_pretrained(path)
    batch = model.prepare([TEXT], images=[image(0, (IMAGE_SIZE, IMAGE_SIZE))])
    seq = batch.input_ids.shape[1]

    def streamed():
        return cross_modal_contribution(model, batch)

    def cache():
        keep = ("attn.hook_pattern", "attn.hook_v")
        _, cached = model.run_with_cache(batch, names_filter=lambda n: n.endswith(keep),
                                         output_attentions=False)
        acc = ContributionAccumulator(model)
        for name, fn in acc.hooks(batch):   # same code, fed from the cache
            fn(cached[name], None)
        return acc.result()

    run = {"forward": lambda: model(batch),
           "forward_lean": lambda: model(batch, output_attentions=False),
           "streamed": streamed, "cache": cache}[variant]
    with torch.no_grad():
        run()                                   # warm-up: lazy initialisation, not measured
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            method = "VmHWM after clear_refs"
        except OSError:
            method = "ru_maxrss (includes load-time peaks)"
        before = _rss_kb("VmRSS")
        out = run()
        peak = (_rss_kb("VmHWM") if method.startswith("VmHWM")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    shares = out.per_layer().tolist() if variant in ("streamed", "cache") else None
    print(json.dumps({"variant": variant, "seq": seq, "added_mib": (peak - before) / 1024,
                      "method": method, "per_layer": shares}))


def measure(path: Path, variant: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), variant], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(n_layers: int) -> None:
    import torch

    from tests.tiny.chameleon import build as build_chameleon

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        build_chameleon(Path(tmp), layers=n_layers, hidden=64, heads=8, image_size=IMAGE_SIZE)
        res = {v: measure(Path(tmp), v) for v in VARIANTS}
    diff = (torch.tensor(res["streamed"]["per_layer"])
            - torch.tensor(res["cache"]["per_layer"])).abs().max().item()
    pattern_mib = 8 * res["forward"]["seq"] ** 2 * 4 / 2**20
    print(f"{n_layers} layers; sequence: {res['forward']['seq']} tokens; one layer's pattern: "
          f"{pattern_mib:.1f} MiB; method: {res['forward']['method']}")
    for v in VARIANTS:
        print(f"{v:>12}: peak added {res[v]['added_mib']:7.1f} MiB")
    lean = res["forward_lean"]["added_mib"]
    extra = {v: res[v]["added_mib"] - lean for v in ("streamed", "cache")}
    print(f"over the lean forward: streamed {extra['streamed']:+.1f} MiB, "
          f"cache {extra['cache']:+.1f} MiB")
    ratio = res["cache"]["added_mib"] / res["streamed"]["added_mib"]
    print(f"peak ratio cache / streamed: {ratio:.2f}")
    print(f"max |streamed - cache| of per-layer shares: {diff:.2e}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.path.insert(0, str(ROOT))
        child(sys.argv[2], sys.argv[3])
    else:
        import argparse

        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
        sys.path.insert(0, str(ROOT))
        main(parser.parse_args().layers)
