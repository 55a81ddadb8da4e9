"""The cost of find_gates' search over every single image-side position, in forwards.

Model: a random Chameleon (default 8 decoder layers, hidden 256, 8 heads) whose VQ
tokenizer turns a 64 px image into a 16 x 16 = 256-token grid; with BOI, EOI and ~30
words of text after the image one example is ~290 tokens. Batch: 4 examples.

Pass 1 of ``find_gates`` (what covers every single position) runs, per batch: one forward
with gradients (the clean run too, for this next-token task) and its backward, and one
forward per distinct position class; a backward costs about two forwards, so the budget
is ``3 + n_classes`` forwards. The script times pass 1 (``cost["seconds"]``) against a
plain forward timed just before it (the median of three; a shared machine drifts), with
and without the per-row classes, and prints the median ratio over ``--reps`` searches
next to the budget. The checks (exact knockouts of chosen positions), the layer sweep and
the neighbourhood overlap are extra passes that the ratio leaves out; the per-example
checks' time is printed apart.

Run: ``.venv/bin/python benchmarks/find_gates_cost.py [--layers 8] [--hidden 256] [--reps 5]``
"""

from __future__ import annotations

import statistics
import time

from _chameleon import TEXT, parser, random_chameleon


def main() -> None:
    p = parser(__doc__.splitlines()[0], layers=8, hidden=256)
    p.add_argument("--batches", type=int, default=2)
    args = p.parse_args()
    model = random_chameleon(args)

    import torch

    from tests.tiny import image
    from tl_vlm import analyses as A
    from tl_vlm.eval.tasks import Example, NextTokenTask

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

    def forward_seconds() -> float:
        """Median of three plain forwards (timed next to each search: the machine drifts)."""
        times = []
        with torch.no_grad():
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                model(batch)
                sync()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    forward_seconds()                                    # warm-up
    for rows in (False, True):
        ratios, units, checks = [], [], []
        for _ in range(args.reps):
            units.append(forward_seconds())
            gates = A.find_gates(model, task, batch_size=args.batch, rows=rows, check_top=1,
                                 check_random=0, layer_sweep=False, overlap=False)
            phases = gates.cost["seconds"]
            seconds = (phases["clean_and_gradient"] + phases["classes"]) / gates.cost["batches"]
            ratios.append(seconds / units[-1])
            checks.append(phases.get("example_checks", 0.0) / gates.cost["batches"] / units[-1])
        cost = gates.cost
        ratio = statistics.median(ratios)
        print(f"rows={str(rows):5}: {cost['n_classes']} classes -> {cost['passes_per_batch']} passes "
              f"per batch, budget {cost['budget_forwards']} forwards; measured (median of "
              f"{args.reps}) {ratio:.1f} plain forwards ({statistics.median(units) * 1e3:.0f} ms; "
              f"range {min(ratios):.1f}-{max(ratios):.1f}) = {ratio / cost['budget_forwards']:.2f} "
              f"x the budget; seconds per phase, last run: {cost['seconds']}")
        per_example = cost["passes"]["example_check_forward"] / cost["batches"]
        print(f"   apart: the per-example checks, {per_example:.0f} forwards per batch, took "
              f"{statistics.median(checks):.1f} plain forwards")


if __name__ == "__main__":
    main()
