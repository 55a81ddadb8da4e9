"""Pass 1 of a gate search, and the exact knockouts after it.

**Classes** are knocked out exactly, one forward each (every position, queries ``"all"``,
stops attending to them in every layer: the paper's knockout, post-softmax zero, no
renormalisation); the task's own score under the knockout is kept too.

**Single positions** get an attribution-patching estimate from one backward pass. With
``A[l, h, q, k]`` the post-softmax pattern and ``M`` the metric
(:class:`~tl_vlm.analyses.gates.GateMetric`),

    estimate(k) = sum over layers l, heads h, queries q of dM/dA[l, h, q, k] * A[l, h, q, k]

is the first-order drop of ``M`` when the edges into ``k`` are knocked out: the derivative
of ``M`` with respect to a scale on every edge into ``k``
(:class:`~tl_vlm.core.attention_edits.KeyScale`), which the attention function applies to
``k``'s value vector, so the pattern is never built and the backward is SDPA's own. The
corrupted run of attribution patching (every image-side key knocked out) is the
``image_side`` class: the denominator of every share. Per layer, the same sum restricted
to one layer estimates the knockout in that layer only. With ``alpha < 1`` the gradient is
taken with every image-side edge scaled by ``alpha`` (a one-point integrated gradient).
Each example's estimate is clipped at zero before the mean over examples: exact
knockout drops are almost never negative, first-order ones often are.

First order can understate a saturated model's gate many times over and miss a knockout
that flips a few answers outright, so in each example the ``check_per_example`` positions
with the largest estimates are knocked out exactly (round j: every example's own j-th
best, one forward); a position's ``refined`` value is the mean of its exact drop where it
was measured and its estimate elsewhere. The best by refined value and a random sample
are then knocked out exactly in every example (:meth:`BatchSearch.exact_positions`). How
well this ranks positions on the toy models: ``docs/gate-finder-measurements.md``.

Example:
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.eval.tasks import toy_task
    >>> from tl_vlm.analyses.gates import GateMetric
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> task = toy_task(6)
    >>> search = BatchSearch(model, task, GateMetric(), "all", rows=False, alpha=1.0)
    >>> grad = search.attribution(task.prepare(model, task.examples), task.examples)
    >>> grad["estimate"].shape                                     # [layer, batch, pos]
    torch.Size([4, 6, 46])
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_vlm.analyses.contribution import ContributionAccumulator
from tl_vlm.analyses.gates.candidates import (IMAGE_SIDE, Key, candidate_classes, position_roles,
                                              role_label)
from tl_vlm.analyses.gates.config import Queries
from tl_vlm.analyses.gates.metric import AnswerTargets, GateMetric
from tl_vlm.analyses.gates.stats import per_example
from tl_vlm.analyses.knockout import Hook, knockout_hooks, progressive_widths
from tl_vlm.analyses.logit_lens import final_logit_transform
from tl_vlm.core.attention_edits import KeyScale, PatternReader
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.positions import ImagePositions, PositionSet
from tl_vlm.core.recompute import recompute_blocks


class BatchSearch:
    """The passes of :func:`~tl_vlm.analyses.gates.find_gates` and their running sums.

    :meth:`add` runs pass 1 on a batch (the gradient pass, the class knockouts, the
    per-example checks); :meth:`exact_positions` and :meth:`layer_sweep` run the later
    exact passes over the same batches, against pass 1's clean metric.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> from tl_vlm.analyses.gates import GateMetric
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> task = toy_task(6)
        >>> search = BatchSearch(model, task, GateMetric(), "all", rows=False, alpha=1.0)
        >>> search.add(0, task.prepare(model, task.examples), task.examples, contribution=None)
        >>> sorted(search.classes)[:3], search.cost["grad_forward"], search.cost["backward"]
        (['boi', 'eoi', 'first_image'], 1, 1)
        >>> drops = search.exact_positions([(0, task.examples)], [("eoi", 0)], say=print)
        [find_gates] exact knockouts of 1 position set(s)
        >>> torch.equal(drops[("eoi", 0)], search.exact_from_classes()[("eoi", 0)])
        True
    """

    def __init__(self, model, task, metric: GateMetric, queries: Queries, rows: bool,
                 alpha: float, per_example: int = 0, recompute: bool = False) -> None:
        self.model, self.task, self.metric = model, task, metric
        self.queries, self.rows, self.alpha = queries, rows, alpha
        self.per_example, self.recompute = per_example, recompute
        self.targets = AnswerTargets(model, task)
        # For lm_head's output (unembed.hook_out); model.last_logits are the model's logits,
        # the family's final transform (a logit scale, a soft-cap) already applied.
        self.transform = final_logit_transform(model)
        self.n_layers = model.cfg.n_layers
        self.n = 0
        self.clean_score = 0.0
        self.clean_metric = 0.0
        # class name -> [sum of scores, examples, positions]
        self.classes: dict[str, list[float]] = {}
        # class name -> batch start -> per-example drops (NaN where the class is absent)
        self.class_drops: dict[str, dict[int, Tensor]] = {}
        self.class_layers: dict[str, Tensor] = {}
        # role -> sums over the examples that have it
        self.est: dict[Key, Tensor] = {}          # [layer] summed estimate
        self.drop: Counter = Counter()              # summed per-example estimate clipped at 0
        self.refined: Counter = Counter()           # the same, exact where checked in the example
        self.checked_in: Counter = Counter()        # examples where it was checked exactly
        self.count: Counter = Counter()
        self.tokens: dict[Key, str] = {}
        self.member: dict[Key, set] = {}           # classes holding the role wherever it is
        self.several_images = False
        self.distinct: set = set()                  # classes knocked out on their own somewhere
        self.alias_of: dict[str, set] = {}          # class -> classes with the same positions
        self.class_forwards = 0
        self.batches = 0
        self.clean_of: dict[int, tuple] = {}       # batch start -> (metric, targets, allowed)
        self.starts: dict[int, int] = {}           # batch start -> its examples, in order
        self.logit_scoring = False                  # the task scores from the last logits
        self.cost = Counter()
        self.seconds = Counter()

    # the score under some hooks -------------------------------------------------------
    def query_set(self, pos: ImagePositions) -> PositionSet:
        return pos.all if self.queries == "all" else pos.text

    def knockout(self, batch: VLMBatch, keys: PositionSet, layers="all") -> list[Hook]:
        return knockout_hooks(self.model, batch, keys=keys, queries=self.query_set(batch.positions),
                              layers=layers)

    def scored(self, batch: VLMBatch, examples, hooks: Sequence[Hook]) -> tuple[Tensor, Tensor]:
        """(task scores, last-position logits of the prompt pass) under ``hooks``: one
        forward when the task scores from the last logits, else one ``task.score`` call,
        with a read-only hook keeping the logits of its prompt forward."""
        if self.logit_scoring:
            with torch.no_grad():
                raw = self.model.last_logits(batch, fwd_hooks=list(hooks))
            self.cost["forward"] += 1
            return (self.task.score_from_logits(self.model, examples, raw).float().cpu(),
                    raw.float().cpu())
        kept: dict[str, Tensor] = {}

        def keep(logits: Tensor, hook) -> None:
            if "last" not in kept:           # later calls: cached generation steps
                # full logits, or only the last positions' (logits_to_keep): last_of reads both
                kept["last"] = self.transform(batch.last_of(logits.detach())).float().cpu()

        scores = self.task.score(self.model, batch, examples,
                                 fwd_hooks=list(hooks) + [("unembed.hook_out", keep)])
        if "last" not in kept:
            raise RuntimeError("the task's score never ran a forward pass over the whole prompt "
                               "(no logits at unembed.hook_out): find_gates needs one")
        self.cost["forward"] += 1
        return scores.float().cpu(), kept["last"]

    @torch.no_grad()
    def metric_under(self, batch: VLMBatch, hooks: Sequence[Hook], targets, allowed,
                     counter: str = "check_forward") -> Tensor:
        last = self.model.last_logits(batch, fwd_hooks=hooks).float().cpu()
        self.cost[counter] += 1
        return self.metric(last, targets, allowed)

    def check_per_example(self, batch: VLMBatch, drop: Float[Tensor, "batch pos"],
                          refined: Float[Tensor, "batch pos"], checked: Bool[Tensor, "batch pos"],
                          clean: Tensor, targets, allowed) -> None:
        """Each example's ``per_example`` image-side positions with the largest (clipped)
        estimates ``drop``, knocked out exactly: round j knocks out every example's j-th
        best, one forward for the batch. Positions already ``checked`` (a class of one
        position measured them) are skipped. Writes the exact drops into ``refined`` and
        marks them in ``checked``."""
        pos = batch.positions.to("cpu")
        candidates = drop.masked_fill(~pos.image_side.mask | checked, float("-inf"))
        rounds = min(self.per_example, int(candidates.isfinite().sum(1).max()))
        best = candidates.argsort(dim=1, descending=True, stable=True)[:, :rounds]   # [batch, rounds]
        rows = torch.arange(len(drop))
        for j in range(rounds):
            col = best[:, j]
            valid = candidates[rows, col].isfinite()
            keys = PositionSet.from_lists([[int(c)] if v else [] for c, v in zip(col, valid)],
                                          pos.seq_len)
            exact = clean - self.metric_under(batch, self.knockout(batch, keys), targets, allowed,
                                              counter="example_check_forward")
            refined[rows[valid], col[valid]] = exact[valid]
            checked[rows[valid], col[valid]] = True

    # attribution ---------------------------------------------------------------------
    def attribution(self, batch: VLMBatch, examples, extra: Sequence[Hook] = (),
                    clean: Optional[tuple] = None) -> dict[str, Any]:
        """Per (layer, example, key): the derivative of the metric with respect to a scale
        on every edge into the key (:class:`~tl_vlm.core.attention_edits.KeyScale`, applied to
        the values: SDPA forward and backward), taken with the image-side scales at
        ``alpha``: one forward, one backward. The sum over layers estimates the drop when
        the key is knocked out. ``extra`` hooks ride along (the contribution's readers);
        ``clean`` is ``(targets, allowed)`` when a clean pass already fixed them, else the
        targets are read from this pass's logits (at ``alpha`` = 1 it *is* the clean run).

        Returns ``estimate [layer, batch, pos]``, ``metric``, ``last`` (the model's last
        logits, float32 on the CPU) and ``raw_last`` (as computed), ``targets``, ``allowed``."""
        pos = batch.positions
        queries = None if self.queries == "all" else self.query_set(pos).mask
        base = torch.where(pos.image_side.mask, self.alpha, 1.0)
        scales = [base.clone().requires_grad_(True) for _ in range(self.n_layers)]
        hooks = list(extra) + [
            (f"blocks.{l}.attn.hook_pattern", KeyScale(s, query_mask=queries, padding=pos.padding.mask))
            for l, s in enumerate(scales)]
        # The hooks stay registered through the backward: recomputed blocks fire them again.
        with torch.enable_grad(), no_weight_grads(self.model), self.model.hooks(fwd_hooks=hooks), \
                recompute_blocks(self.model, enabled=self.recompute):
            raw = self.model.last_logits(batch, use_cache=False)
            last = raw   # the model's logits: its final transform is already applied
            targets, allowed = clean if clean is not None else \
                self.targets(examples, last.detach().float().cpu())
            m = self.metric(last, targets, allowed)
            if not m.requires_grad:
                raise RuntimeError("no gradient reached the metric from the attention scales")
            grads = torch.autograd.grad(m.sum(), scales, allow_unused=True)
        self.cost["grad_forward"] += 1
        self.cost["backward"] += 1
        self.cost["recompute_forward"] += self.recompute
        missing = [l for l, g in enumerate(grads) if g is None]
        if missing:
            raise RuntimeError(f"no gradient reached the attention scales of layers {missing}")
        return {"estimate": torch.stack([g.float().cpu() for g in grads]),
                "metric": m.detach().float().cpu(), "last": last.detach().float().cpu(),
                "raw_last": raw.detach(), "targets": targets, "allowed": allowed}

    # one batch -------------------------------------------------------------------------
    def add(self, start: int, batch: VLMBatch, examples,
            contribution: Optional[ContributionAccumulator]) -> None:
        pos = batch.positions.to("cpu")
        t0 = time.perf_counter()
        extra = []
        if contribution is not None and not pos.after_image.is_empty():
            extra = [(name, first_call_only(fn)) for name, fn in contribution.hooks(batch)]
        # At alpha = 1 the gradient pass is the clean run: when the task scores from the
        # last logits of one forward (next-token tasks), that pass is the clean one too.
        scores = None
        if self.alpha == 1.0:
            grad = self.attribution(batch, examples, extra)
            scores = self.task.score_from_logits(self.model, examples, grad["raw_last"])
            self.logit_scoring = scores is not None     # the class passes: one forward each
        if scores is None:       # a task that generates, or a gradient away from the clean run
            scores, clean_last = self.scored(batch, examples, [] if self.alpha == 1.0 else extra)
            targets, allowed = self.targets(examples, clean_last)
            clean = self.metric(clean_last, targets, allowed)
            if self.alpha == 1.0:
                # The same inputs must give the same metric (up to the dtype's rounding),
                # else the two passes measure different runs.
                tol = (1e-3 if self.model.dtype == torch.float32 else 5e-2) * (1 + clean.abs().max().item())
                if not torch.allclose(grad["metric"], clean, atol=tol):
                    raise RuntimeError("the gradient pass and the clean pass disagree on the metric "
                                       f"({grad['metric'].tolist()} vs {clean.tolist()})")
                if not torch.equal(grad["targets"], targets):
                    grad = self.attribution(batch, examples, clean=(targets, allowed))
            else:
                grad = self.attribution(batch, examples, clean=(targets, allowed))
        else:
            clean, targets, allowed = grad["metric"], grad["targets"], grad["allowed"]
            scores = scores.float().cpu()
        est = grad["estimate"]
        self.clean_of[start] = (clean, targets, allowed)    # the later passes' baseline
        self.starts[start] = len(examples)
        t2 = time.perf_counter()
        self.seconds["clean_and_gradient"] += t2 - t0
        self.n += len(examples)
        self.clean_score += scores.sum().item()
        self.clean_metric += clean.sum().item()
        named = candidate_classes(pos, self.rows)
        names = list(named)
        clipped = est.sum(0).clamp(min=0)                                 # [batch, pos]
        # Exact per-example drops known so far: a class of one position in an example
        # measured that position there.
        refined, checked = clipped.clone(), torch.zeros_like(clipped, dtype=torch.bool)
        done: list[tuple[str, PositionSet, Tensor, Tensor]] = []
        for name, keys in named.items():
            same = next(((n, sc, ls) for n, k, sc, ls in done if k == keys), None)
            if same is None:   # a set not knocked out yet in this batch
                scores_k, last_k = self.scored(batch, examples, self.knockout(batch, keys))
                done.append((name, keys, scores_k, last_k))
                self.distinct.add(name)
            else:
                _, scores_k, last_k = same
                self.alias_of.setdefault(name, set()).add(same[0])
            drops = clean - self.metric(last_k, targets, allowed)          # [batch]
            if name != IMAGE_SIDE:
                single = keys.mask & (keys.counts == 1)[:, None]
                refined = torch.where(single, drops[:, None], refined)
                checked |= single
            present = keys.counts > 0
            self.class_drops.setdefault(name, {})[start] = drops.masked_fill(~present, float("nan"))
            entry = self.classes.setdefault(name, [0.0, 0, 0])
            entry[0] += scores_k[present].sum().item()
            entry[1] += int(present.sum())
            entry[2] += int(keys.counts.sum())
            layer_est = torch.einsum("lbp,bp->l", est, keys.mask.float())
            self.class_layers[name] = self.class_layers.get(name, torch.zeros(self.n_layers)) + layer_est
        self.class_forwards += len(done)
        self.batches += 1
        t3 = time.perf_counter()
        self.seconds["classes"] += t3 - t2
        if self.per_example:
            self.check_per_example(batch, clipped, refined, checked, clean, targets, allowed)
            self.seconds["example_checks"] += time.perf_counter() - t3
        t4 = time.perf_counter()            # the bookkeeping below counts with the classes
        # [batch, pos, class] membership, read as Python lists once (not per position)
        member = torch.stack([s.mask for s in named.values()], dim=-1).tolist()
        ids = batch.input_ids.tolist()
        for b in range(len(examples)):
            self.several_images |= pos.n_images(b) > 1
            roles = position_roles(pos, b)
            at = [p for _, p in roles]
            per_key = est[:, b, at].T                                     # [roles, layer]
            values = zip(clipped[b, at].tolist(), refined[b, at].tolist(), checked[b, at].tolist())
            for (key, p), value, (drop, better, was_checked) in zip(roles, per_key, values):
                self.est[key] = self.est.get(key, torch.zeros(self.n_layers)) + value
                self.drop[key] += drop
                self.refined[key] += better
                self.checked_in[key] += was_checked
                self.count[key] += 1
                inside = {n for n, is_in in zip(names, member[b][p]) if is_in}
                self.member[key] = self.member.get(key, inside) & inside
                if key not in self.tokens:
                    self.tokens[key] = self.model.layout.tokenizer.convert_ids_to_tokens(ids[b][p])
        self.seconds["classes"] += time.perf_counter() - t4

    def label(self, key: Key) -> str:
        return role_label(key, self.several_images)

    def class_exact(self, name: str) -> Tensor:
        """A class's exact drop per example, in order (NaN where the class is absent)."""
        return per_example(self.class_drops[name], self.starts)

    def exact_from_classes(self) -> dict:
        """Positions whose exact knockout a class pass has run: the class's one position per
        example, in exactly the examples that have the position (same drop, same examples).
        Key -> per-example drops (NaN where absent)."""
        known = {}
        for key, names in self.member.items():
            for name in sorted(names & self.distinct):
                _, n, n_pos = self.classes[name]
                if name != IMAGE_SIDE and n_pos == n == self.count[key]:
                    known[key] = self.class_exact(name)
                    break
        return known


    def exact_positions(self, chunks, keys: Sequence, say: Callable[[str], None],
                        together: bool = False) -> dict:
        """Exact drops per role (or per tuple of roles knocked out together), per example in
        order (NaN where the example lacks it); keys no example has are left out."""
        drops_of: dict[Any, dict[int, Tensor]] = {}
        for start, examples in chunks:
            batch = self.task.prepare(self.model, examples)
            pos = batch.positions.to("cpu")
            roles = [dict(position_roles(pos, b)) for b in range(len(examples))]
            clean, targets, allowed = self.clean_of[start]
            for key in keys:
                wanted = key if together else (key,)
                rows = [[r[w] for w in wanted if w in r] for r in roles]
                present = torch.tensor([len(r) > 0 for r in rows])
                if not present.any():
                    continue
                hooks = self.knockout(batch, PositionSet.from_lists(rows, pos.seq_len))
                drop = clean - self.metric_under(batch, hooks, targets, allowed)
                drops_of.setdefault(key, {})[start] = drop.masked_fill(~present, float("nan"))
        say(f"[find_gates] exact knockouts of {len(keys)} position set(s)")
        return {k: per_example(drops_of[k], self.starts) for k in keys if k in drops_of}


    def layer_sweep(self, chunks, target: Optional[list], say: Callable[[str], None]) -> dict:
        """Drop of the metric with ``target`` (roles, or the whole image side when None)
        knocked out in the last w layers only."""
        widths = progressive_widths(self.n_layers)
        sums, count = torch.zeros(len(widths)), 0
        for start, examples in chunks:
            batch = self.task.prepare(self.model, examples)
            pos = batch.positions.to("cpu")
            if target is None:
                keys = pos.image_side
            else:
                roles = [dict(position_roles(pos, b)) for b in range(len(examples))]
                keys = PositionSet.from_lists([[r[t] for t in target if t in r] for r in roles], pos.seq_len)
            clean, targets, allowed = self.clean_of[start]
            for i, w in enumerate(widths):
                layers = list(range(self.n_layers - w, self.n_layers))
                drop = clean - self.metric_under(batch, self.knockout(batch, keys, layers), targets,
                                                   allowed, counter="sweep_forward")
                sums[i] += drop.sum().item()
            count += len(examples)
        effect = (sums / count).tolist()
        full = effect[-1]
        enough = [w for w, e in zip(widths, effect) if full > 0 and e >= 0.9 * full]
        say(f"[find_gates] layer sweep over {len(widths)} widths")
        return {"widths": widths, "effect": effect,
                "from_layer": self.n_layers - min(enough) if enough else None}


@contextlib.contextmanager
def no_weight_grads(model) -> Iterator[None]:
    """Within the block no parameter requires grad: the backward computes the gradients
    of the attention scales only, and the forward keeps no input for a weight gradient.

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> with no_weight_grads(layer):
        ...     layer.weight.requires_grad
        False
        >>> layer.weight.requires_grad
        True
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _FirstCallReader(PatternReader):
    """A :class:`~tl_vlm.core.attention_edits.PatternReader` that reads in its first attention
    call only, and is still one: the attention function keeps to SDPA and hands it its
    rows (a plain function in its place would make the layer eager)."""

    def __init__(self, reader: PatternReader) -> None:
        self.reader, self.calls = reader, 0

    def begin(self, q_len: int, k_len: int) -> None:
        self.calls += 1
        if self.calls == 1:
            self.reader.begin(q_len, k_len)

    def rows(self, q_len: int, k_len: int) -> Tensor:
        if self.calls == 1:
            return self.reader.rows(q_len, k_len)
        return torch.zeros(q_len, dtype=torch.bool)

    def read(self, rows: Tensor, pattern: Tensor) -> None:
        if self.calls == 1:
            self.reader.read(rows, pattern)


def first_call_only(fn: Callable) -> Callable:
    """A hook that runs ``fn`` on its first call only: the prompt pass of a task that
    generates (the contribution measures one full pass, not the cached steps), or the
    forward of a gradient pass whose blocks are recomputed in the backward.

    Example:
        >>> seen = []
        >>> hook = first_call_only(lambda x, hook: seen.append(x))
        >>> hook(1, None), hook(2, None), seen
        (None, None, [1])
    """
    if isinstance(fn, PatternReader):
        return _FirstCallReader(fn)
    calls = []

    def hook(x: Tensor, hook) -> None:
        calls.append(None)
        if len(calls) == 1:
            fn(x, hook)

    return hook
