"""Time a full-layer patching sweep: naive (full forward per layer) vs prefix reuse.

Model: a random Chameleon with 10 decoder layers (hidden 64, 8 heads, 2 kv heads) whose
VQ tokenizer turns a 64 px image into a 16 x 16 = 256-token grid; with BOI, EOI and ~30
words of text after the image one example is ~300 tokens. Batch: 4 source and 4 target
examples (different images, same prompts).

Both sweeps patch the gate (EOI) over every layer, for the residual stream (input of
layer l only) and the attention stream (attention input of every layer from l on):

- ``naive``: ``patch_positions(..., reuse_prefix=False)``: one source run, one clean
  target run, then per layer a full forward with the patching hooks;
- ``prefix``: ``patch_positions(...)``: the same, but the clean target run caches every
  ``hook_resid_pre`` and each patched run starts at its layer (blocks before it skipped).

Counting decoder blocks only, a sweep over L layers costs L*L + 2L blocks naively and
L(L+1)/2 + 2L with prefix reuse (1.6x fewer for L = 10); embedding, the VQ image encoder
and the LM head run in every forward of both. Repetitions alternate the two variants;
the script prints medians of wall-clock and process CPU time (the latter is steadier on a
shared machine), the speed ratios and the largest difference between the two sweeps.

Run: ``.venv/bin/python benchmarks/patching_sweep.py [--layers 10] [--reps 5] [--device cpu]``
"""

from __future__ import annotations

import statistics
import time

from _chameleon import TEXT, parser, random_chameleon


def main() -> None:
    p = parser(__doc__.splitlines()[0], layers=10, hidden=64)
    args = p.parse_args()
    model = random_chameleon(args)

    import torch

    from tests.tiny import image
    from tl_vlm.analyses.patching import patch_positions

    prompts = [TEXT] * args.batch
    target = model.prepare(prompts, images=[image(i, (args.image_size,) * 2) for i in range(args.batch)])
    source = model.prepare(prompts, images=[image(100 + i, (args.image_size,) * 2)
                                            for i in range(args.batch)])
    seq = target.input_ids.shape[1]
    L = model.cfg.n_layers
    print(f"Chameleon, {L} layers, d_model {model.cfg.d_model}, batch {args.batch} x {seq} "
          f"tokens ({(args.image_size // 4) ** 2} image tokens), device {args.device}, "
          f"{torch.get_num_threads()} thread(s), {args.reps} repetitions")

    def sync() -> None:
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(2):  # warm-up
            model(target)
        sync()
        t = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            model(target)
            sync()
            t.append(time.perf_counter() - t0)
        print(f"one full forward: {statistics.median(t) * 1e3:.1f} ms (median)")
        blocks_naive, blocks_prefix = L * L + 2 * L, L * (L + 1) // 2 + 2 * L
        print(f"decoder blocks per sweep: naive {blocks_naive}, prefix {blocks_prefix} "
              f"(ratio {blocks_naive / blocks_prefix:.2f})")
        for stream in ("resid_pre", "attn_in"):
            wall = {"naive": [], "prefix": []}
            cpu = {"naive": [], "prefix": []}
            results = {}
            for rep in range(args.reps + 1):  # the first round is a warm-up
                order = ("naive", "prefix") if rep % 2 == 0 else ("prefix", "naive")
                for variant in order:
                    sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    res = patch_positions(model, source, target, positions="gate", layers="all",
                                          stream=stream, reuse_prefix=(variant == "prefix"))
                    sync()
                    if rep:
                        wall[variant].append(time.perf_counter() - t0)
                        cpu[variant].append(time.process_time() - c0)
                    results[variant] = res
            diff = (results["naive"].logits - results["prefix"].logits).abs().max().item()
            moved = (results["prefix"].logits - results["prefix"].clean_logits).abs().max().item()
            for label, times in (("wall", wall), ("cpu", cpu)):
                naive, prefix = (statistics.median(times[v]) for v in ("naive", "prefix"))
                print(f"{stream:>9} {label:>4}: naive {naive * 1e3:8.1f} ms   prefix "
                      f"{prefix * 1e3:8.1f} ms   speed-up x{naive / prefix:.2f}")
            print(f"{stream:>9}: max |naive - prefix| {diff:.1e} (the patch moved the logits by "
                  f"up to {moved:.1e})")
            if diff > 1e-4:
                raise SystemExit(f"the two sweeps disagree by {diff}")


if __name__ == "__main__":
    main()
