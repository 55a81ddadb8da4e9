"""Attention edits that never need the whole ``[batch, head, query, key]`` pattern.

A hook on ``hook_pattern`` sees the full pattern: for a 16k-token prompt in a batch of 8
that is tens of GB per layer. The Narrow Gate analyses touch only a sliver of it:

- a **knockout** cuts the edges from a query set Q to a key set K (post-softmax zero, or
  pre-softmax ``-inf``): an outer product per example, optionally for some heads;
- **cross-modal contribution** reads the rows of the text queries only.

Hooks of these two kinds are objects (:class:`EdgeCut`, :class:`PatternReader`) that
still work as ordinary TransformerLens hooks on the full pattern, but also tell the
attention function (:mod:`tl_vlm.core.attention`) what they need. When every hook on a layer's
``hook_attn_scores``/``hook_pattern`` is one of them, the layer runs
:func:`fused_attention`: PyTorch's SDPA for the output, and the pattern only for the query
rows an edit touches, a chunk of rows at a time:

- ``"mask"`` cuts go into SDPA's boolean mask (softmax renormalises over what is left);
- ``"zero"`` cuts (the paper's: no renormalisation) of *every* query's edges into some
  keys, and :class:`KeyScale` edits, scale those keys' value vectors before SDPA:
  ``sum over k of p[q, k] s[k] v[k]`` is the output with the column ``k`` of the pattern
  scaled by ``s[k]`` (zero for a cut). No pattern row is computed at all, and a gradient
  with respect to ``s`` flows through SDPA's own backward;
- other ``"zero"`` cuts (some queries, some heads) subtract what the cut edges carried,
  ``out[q] -= sum over cut k of p[q, k] v[k]``, with ``p`` the row's softmax;
- readers get the pattern rows they asked for, after the edits listed before them.

Results equal the eager computation with the hooks on the full pattern (to float
rounding): the same rows are computed the same way.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

#: elements of one ``[batch, head, rows, keys]`` block computed at once (chunks of rows),
#: and at most this many rows per chunk
QUERY_CHUNK_ELEMENTS = 1 << 24
QUERY_CHUNK_ROWS = 256
_CPU = torch.device("cpu")   # where edits decide which rows and keys they touch (no device sync)


def _grown(mask: Tensor, k_len: int, fill) -> Tensor:
    """``[batch, pos]`` extended to ``k_len`` positions with ``fill``: the tokens that
    ``generate`` added after the prompt."""
    grow = k_len - mask.shape[1]
    if grow < 0:
        raise ValueError(f"attention over {k_len} keys but the batch has {mask.shape[1]} positions")
    return torch.cat([mask, mask.new_full((len(mask), grow), fill)], 1) if grow else mask


class AttentionEdit:
    """Base of the hooks the attention function can apply without the full pattern.

    Example:
        >>> issubclass(EdgeCut, AttentionEdit), issubclass(PatternReader, AttentionEdit)
        (True, True)
    """

    point = "hook_pattern"


class EdgeCut(AttentionEdit):
    """Cut attention from ``queries`` to ``keys`` (per example), optionally in some heads.

    ``semantics="zero"`` (a ``hook_pattern`` hook) zeroes the cut weights after the softmax
    without renormalising, as the Narrow Gate paper does; ``"mask"`` (a
    ``hook_attn_scores`` hook) sets their scores to ``-inf`` before it. During cached
    generation the queries are the new tokens: they are in the query set when
    ``generated_queries`` is true, and are never keys.

    One object serves every layer and generation step: the masks for a sequence length
    and device are built once and reused.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(2).prompts)
        >>> pos = batch.positions
        >>> cut = EdgeCut(pos.all.mask, pos.gate.mask)
        >>> pattern = torch.full((2, 4, 46, 46), 0.5)
        >>> out = cut(pattern, None)                         # as a plain hook
        >>> out[0, :, -1, pos.gate[0]].tolist(), out[0, 0, -1, 0].item()
        ([[0.0], [0.0], [0.0], [0.0]], 0.5)
    """

    def __init__(self, query_mask: Bool[Tensor, "batch pos"], key_mask: Bool[Tensor, "batch pos"],
                 heads: Optional[Sequence[int]] = None, semantics: str = "zero",
                 generated_queries: bool = True,
                 padding: Optional[Bool[Tensor, "batch pos"]] = None) -> None:
        if semantics not in ("zero", "mask"):
            raise ValueError(f"semantics must be 'zero' or 'mask', got {semantics!r}")
        self.query_mask = query_mask.bool().cpu()
        self.key_mask = key_mask.bool().cpu()
        # Padding rows' outputs are never read (no other position attends to them): a cut
        # of every non-padding query may treat them as queries too, and cut by the values.
        self.padding = None if padding is None else padding.bool().cpu()
        self.heads = None if heads is None else list(heads)
        self.semantics = semantics
        self.point = "hook_pattern" if semantics == "zero" else "hook_attn_scores"
        self.generated_queries = generated_queries
        self._cache: dict[tuple, tuple[Tensor, Tensor, Optional[Tensor]]] = {}

    def factors(self, k_len: int, n_heads: int, device: torch.device
                ) -> tuple[Bool[Tensor, "batch k"], Bool[Tensor, "batch k"], Optional[Tensor]]:
        """``(queries, keys, heads)`` over all ``k_len`` positions (generated ones
        included) on ``device``; ``heads`` is ``[n_heads]`` or None for all heads."""
        key = (k_len, n_heads, str(device))
        if key not in self._cache:
            # generated tokens: never keys, queries if generated_queries
            keys = _grown(self.key_mask, k_len, False)
            queries = _grown(self.query_mask, k_len, self.generated_queries)
            heads = None
            if self.heads is not None:
                heads = torch.zeros(n_heads, dtype=torch.bool)
                heads[self.heads] = True
                heads = heads.to(device)
            self._cache[key] = (queries.to(device), keys.to(device), heads)
        return self._cache[key]

    def key_factor(self, q_len: int, k_len: int, n_heads: int, device: torch.device
                   ) -> Optional[Float[Tensor, "batch k"]]:
        """``1 - keys`` when this call's cut is the same as zeroing the cut keys' value
        vectors (post-softmax zero, all heads, every query of the call but padding);
        None otherwise."""
        if self.semantics != "zero" or self.heads is not None:
            return None
        key = ("factor", q_len, k_len, str(device))
        if key not in self._cache:   # decided on the CPU masks: no device sync
            queries, keys, _ = self.factors(k_len, n_heads, _CPU)
            rows = queries[:, k_len - q_len:]
            if self.padding is not None:
                rows = rows | _grown(self.padding, k_len, False)[:, k_len - q_len:]
            self._cache[key] = (~keys).float().to(device) if bool(rows.all()) else None
        return self._cache[key]

    def apply_rows(self, pattern: Float[Tensor, "batch head r k"], rows: Int[Tensor, "r"],
                   q_len: int) -> Tensor:
        """``pattern`` (the query rows ``rows``) with the cut edges zeroed."""
        b, h, _, k = pattern.shape
        return pattern.masked_fill(self.edges(rows, q_len, k, h, pattern.device), 0.0)

    def edges(self, rows: Int[Tensor, "r"], q_len: int, k_len: int, n_heads: int,
              device: torch.device) -> Bool[Tensor, "batch head_or_1 r k"]:
        """Cut edges of the query rows ``rows`` (indices among this call's ``q_len`` queries)."""
        queries, keys, heads = self.factors(k_len, n_heads, device)
        q = queries[:, k_len - q_len:][:, rows]
        edges = q[:, None, :, None] & keys[:, None, None, :]
        return edges if heads is None else edges & heads[None, :, None, None]

    def __call__(self, tensor: Float[Tensor, "batch head q k"], hook: Any) -> Tensor:
        b, h, q, k = tensor.shape
        rows = torch.arange(q, device=tensor.device)
        edges = self.edges(rows, q, k, h, tensor.device)
        return tensor.masked_fill(edges, 0.0 if self.semantics == "zero" else float("-inf"))


class KeyScale(AttentionEdit):
    """Scale the attention every query pays to each key by a factor per (example, key),
    after the softmax and without renormalising: ``pattern[b, h, q, k] *= scale[b, k]``.

    ``scale`` is ``[batch, pos]`` (keys beyond it, generated tokens, keep 1). Scale 0 is
    the paper's knockout of those keys; a ``scale`` that requires grad gives, after a
    backward pass, ``d metric / d scale[b, k]``: the attribution-patching estimate of
    knocking ``k`` out (see :func:`tl_vlm.analyses.gates.find_gates`). The attention
    function applies it to the value vectors (``p s v = p (s v)``), so it costs what a
    plain SDPA forward (and backward) costs.

    Example (half the weight on key 0, for every query):
        >>> scale = torch.tensor([[0.5, 1.0, 1.0]])
        >>> out = KeyScale(scale)(torch.full((1, 2, 3, 3), 0.3), None)
        >>> out[0, 0].tolist()[2]
        [0.15000000596046448, 0.30000001192092896, 0.30000001192092896]
    """

    point = "hook_pattern"

    def __init__(self, scale: Float[Tensor, "batch pos"],
                 query_mask: Optional[Bool[Tensor, "batch pos"]] = None,
                 padding: Optional[Bool[Tensor, "batch pos"]] = None) -> None:
        if scale.dim() != 2:
            raise ValueError(f"scale must be [batch, pos], got shape {tuple(scale.shape)}")
        self.scale = scale
        # Queries whose attention is scaled (None: all; generated tokens always are), and
        # padding rows, whose outputs nobody reads.
        self.query_mask = None if query_mask is None else query_mask.bool().cpu()
        self.padding = None if padding is None else padding.bool().cpu()

    def scale_over(self, k_len: int, device: torch.device) -> Float[Tensor, "batch k"]:
        """The scale over all ``k_len`` keys (1 for generated ones), on ``device``."""
        return _grown(self.scale.to(device), k_len, 1.0)

    def query_rows(self, k_len: int, device: torch.device,
                   with_padding: bool = False) -> Bool[Tensor, "batch k"]:
        """Which of all ``k_len`` positions are scaled queries (``with_padding``: or padding)."""
        queries = self.query_mask if self.query_mask is not None else \
            torch.ones(self.scale.shape, dtype=torch.bool)
        if with_padding and self.padding is not None:
            queries = queries | self.padding
        return _grown(queries, k_len, True).to(device)

    def key_factor(self, q_len: int, k_len: int, n_heads: int, device: torch.device
                   ) -> Optional[Float[Tensor, "batch k"]]:
        """The scale over the keys when it applies to every query of this call (padding
        aside), so that it may scale the values; None otherwise."""
        if self.query_mask is not None and \
                not bool(self.query_rows(k_len, _CPU, with_padding=True)[:, k_len - q_len:].all()):
            return None
        return self.scale_over(k_len, device)

    def apply_rows(self, pattern: Float[Tensor, "batch head r k"], rows: Int[Tensor, "r"],
                   q_len: int) -> Tensor:
        k_len = pattern.shape[-1]
        factor = self.scale_over(k_len, pattern.device)[:, None, None, :].to(pattern.dtype)
        if self.query_mask is not None:
            scaled = self.query_rows(k_len, pattern.device)[:, k_len - q_len:][:, rows]
            factor = torch.where(scaled[:, None, :, None], factor, torch.ones_like(factor))
        return pattern * factor

    def __call__(self, pattern: Float[Tensor, "batch head q k"], hook: Any) -> Tensor:
        return self.apply_rows(pattern, torch.arange(pattern.shape[2]), pattern.shape[2])


class PatternReader(AttentionEdit):
    """A read-only ``hook_pattern`` hook that needs some query rows only.

    Subclasses say which rows (:meth:`rows`) and consume them (:meth:`read`, called with
    chunks of rows, in order); :meth:`begin` runs once per attention call. Called as a
    plain hook on the full pattern it reads all its rows in one chunk, so the two ways
    of running give the same sums.

    Example (the mean attention that the last query pays to the first key):
        >>> class FirstKey(PatternReader):
        ...     def rows(self, q_len, k_len):
        ...         return torch.arange(q_len) == q_len - 1
        ...     def read(self, rows, pattern):
        ...         self.value = pattern[..., 0].mean().item()
        >>> reader = FirstKey()
        >>> reader(torch.full((1, 2, 3, 3), 0.25), None), reader.value
        (None, 0.25)
    """

    def rows(self, q_len: int, k_len: int) -> Bool[Tensor, "q"]:
        """Which of this call's ``q_len`` query rows the reader needs (any example)."""
        raise NotImplementedError

    def begin(self, q_len: int, k_len: int) -> None:
        """Called once per attention call, before the first :meth:`read`."""

    def read(self, rows: Int[Tensor, "r"], pattern: Float[Tensor, "batch head r k"]) -> None:
        raise NotImplementedError

    def __call__(self, pattern: Float[Tensor, "batch head q k"], hook: Any) -> None:
        b, h, q, k = pattern.shape
        self.begin(q, k)
        rows = self.rows(q, k).to(pattern.device).nonzero().flatten()
        if rows.numel():
            self.read(rows, pattern[:, :, rows].detach())   # reading joins no autograd graph
        return None


def allowed_keys(mask: Optional[Tensor], rows: Int[Tensor, "r"], q_len: int, k_len: int,
                 causal: bool) -> Bool[Tensor, "batch_or_1 1 r k"]:
    """Which keys each query row may attend to, from the boolean (SDPA-style) mask or,
    when the mask was skipped (None), from causality as SDPA's ``is_causal`` applies it.

    Example:
        >>> allowed_keys(None, torch.tensor([0, 2]), 3, 3, causal=True)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 1]]
    """
    if mask is not None:
        return mask[:, :, rows] if mask.dtype == torch.bool else mask[:, :, rows] > torch.finfo(mask.dtype).min
    k = torch.arange(k_len, device=rows.device)
    if not causal or q_len == 1:
        return torch.ones(1, 1, len(rows), k_len, dtype=torch.bool, device=rows.device)
    return (k[None, :] <= rows[:, None])[None, None]  # upper-left, like SDPA's is_causal


def _grouped(x: Tensor, n_rep: int) -> Tensor:
    """``[b, heads, r, d] -> [b, kv_heads, rep * r, d]`` (query head h = kv * rep + i)."""
    b, h, r, d = x.shape
    return x.reshape(b, h // n_rep, n_rep * r, d)


def pattern_rows(query: Tensor, key: Tensor, rows: Int[Tensor, "r"], scaling: float,
                 allowed: Tensor, score_cuts: Sequence[EdgeCut], n_rep: int) -> Tensor:
    """The eager pattern ``[b, h, r, k]`` of the query rows ``rows`` (same ops as eager
    attention: scores in the model dtype, softmax in float32, mask-style cuts first).

    Example:
        >>> q = k = torch.zeros(1, 2, 3, 4)                      # equal scores everywhere
        >>> rows = torch.tensor([2])
        >>> pattern_rows(q, k, rows, 0.5, allowed_keys(None, rows, 3, 3, True), [], 1)[0, 0]
        tensor([[0.3333, 0.3333, 0.3333]])
    """
    b, h, _, d = query.shape
    k_len = key.shape[2]
    q = _grouped(query[:, :, rows], n_rep)
    scores = torch.matmul(q, key.transpose(2, 3)).view(b, h, len(rows), k_len) * scaling
    min_value = torch.finfo(scores.dtype).min
    scores = scores + torch.where(allowed, torch.zeros((), dtype=scores.dtype, device=scores.device),
                                  torch.tensor(min_value, dtype=scores.dtype, device=scores.device))
    for cut in score_cuts:
        scores = scores.masked_fill(cut.edges(rows, query.shape[2], k_len, h, scores.device),
                                    float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


def cut_mask(mask: Optional[Tensor], score_cuts: Sequence[EdgeCut], q_len: int, k_len: int,
             n_heads: int, causal: bool, device: torch.device) -> Tensor:
    """The SDPA boolean mask with every ``"mask"`` cut removed from what may be attended.

    Example:
        >>> everything = torch.ones(1, 3, dtype=torch.bool)
        >>> cut = EdgeCut(everything, torch.tensor([[True, False, False]]), semantics="mask")
        >>> cut_mask(None, [cut], 3, 3, 2, True, torch.device("cpu"))[0, 0].int().tolist()
        [[0, 0, 0], [0, 1, 0], [0, 1, 1]]
    """
    rows = torch.arange(q_len, device=device)
    allowed = allowed_keys(mask, rows, q_len, k_len, causal)
    for cut in score_cuts:
        allowed = allowed & ~cut.edges(rows, q_len, k_len, n_heads, device)
    return allowed


def fused_attention(sdpa, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                    mask: Optional[Tensor], scaling: float, score_cuts: Sequence[EdgeCut],
                    pattern_edits: Sequence[AttentionEdit], **kwargs: Any) -> Tensor:
    """Attention output ``[b, q, h, d]`` with the edits applied, never holding more of
    the pattern than one chunk of rows (see the module docstring).

    ``sdpa`` is Hugging Face's ``sdpa_attention_forward`` (so the unedited part is
    computed exactly as with ``attn_implementation="sdpa"``).

    Example (a cut of the first key, without renormalisation, equals the eager edit):
        >>> from transformers.integrations.sdpa_attention import sdpa_attention_forward
        >>> module = torch.nn.Module()
        >>> q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
        >>> cut = EdgeCut(torch.ones(1, 4, dtype=torch.bool), torch.tensor([[1, 0, 0, 0]]).bool())
        >>> out = fused_attention(sdpa_attention_forward, module, q, k, v, None, 8 ** -0.5, [], [cut])
        >>> rows = torch.arange(4)
        >>> p = cut(pattern_rows(q, k, rows, 8 ** -0.5, allowed_keys(None, rows, 4, 4, True), [], 1), None)
        >>> torch.allclose(out, (p @ v).transpose(1, 2), atol=1e-6)
        True
    """
    b, h, q_len, d = query.shape
    k_len = key.shape[2]
    device = query.device
    causal = getattr(module, "is_causal", True)
    n_rep = h // key.shape[1]
    sdpa_mask = mask if not score_cuts else cut_mask(mask, score_cuts, q_len, k_len, h, causal, device)
    # Edits of every query's edges into some keys: scale those keys' values instead.
    by_value: dict[int, Tensor] = {}
    for edit in pattern_edits:
        factor = edit.key_factor(q_len, k_len, h, device) if hasattr(edit, "key_factor") else None
        if factor is not None:
            by_value[id(edit)] = factor
    scaled_value = value
    if by_value:
        factor = torch.stack(list(by_value.values())).prod(0) if len(by_value) > 1 \
            else next(iter(by_value.values()))
        scaled_value = value * factor[:, None, :, None].to(value.dtype)
    out, _ = sdpa(module, query, key, scaled_value, sdpa_mask, dropout=0.0, scaling=scaling, **kwargs)
    by_rows = [e for e in pattern_edits if not isinstance(e, PatternReader) and id(e) not in by_value]
    readers = [e for e in pattern_edits if isinstance(e, PatternReader)]
    if not by_rows and not readers:
        return out
    for reader in readers:
        reader.begin(q_len, k_len)
    # Which rows and keys: decided on the CPU masks (no device sync per layer).
    needed = torch.zeros(q_len, dtype=torch.bool)
    for reader in readers:
        needed |= reader.rows(q_len, k_len).cpu()
    key_cols = torch.zeros(b, k_len, dtype=torch.bool)
    cuts = []
    for edit in by_rows:
        if isinstance(edit, EdgeCut):
            queries, keys, _ = edit.factors(k_len, h, _CPU)
            cuts.append(edit)
        else:   # a KeyScale of some queries only: any key may change
            queries, keys = edit.query_rows(k_len, _CPU), key_cols.new_ones(b, k_len)
        needed |= queries[:, k_len - q_len:].any(0)
        key_cols |= keys
    cols = key_cols.any(0).nonzero().flatten().to(device)  # the only keys an edit by rows changes
    rows_all = needed.nonzero().flatten()
    chunk = min(QUERY_CHUNK_ROWS, max(1, QUERY_CHUNK_ELEMENTS // max(1, b * h * k_len)))
    v_cols = value[:, :, cols]                  # unscaled: the pattern carries the scales
    # Readers only read: no autograd graph for their rows.
    grad = torch.is_grad_enabled() and bool(by_rows)
    for rows_on_cpu in rows_all.split(chunk):
        rows = rows_on_cpu.to(device)
        allowed = allowed_keys(mask, rows, q_len, k_len, causal)
        if not readers and len(cuts) == len(by_rows):
            # e.g. rows before the gate: causally they never see it (a plain causal mask,
            # None, is decided on the CPU; a mask tensor where it is)
            seen = _any_cut_allowed(cuts, rows, allowed, q_len, k_len, h, device) if mask is not None \
                else _any_cut_allowed(cuts, rows_on_cpu, allowed_keys(None, rows_on_cpu, q_len, k_len, causal),
                                      q_len, k_len, h, _CPU)
            if not seen:
                continue
        with torch.set_grad_enabled(grad):
            pattern = pattern_rows(query, key, rows, scaling, allowed, score_cuts, n_rep)
            removed = None
            for edit in pattern_edits:
                if isinstance(edit, PatternReader):
                    edit.read(rows, pattern.detach())
                    continue
                edited = edit.apply_rows(pattern, rows, q_len)
                if id(edit) not in by_value:     # in the values already if it is there
                    taken = (pattern - edited)[..., cols]
                    removed = taken if removed is None else removed + taken
                pattern = edited
            if removed is not None and len(cols):
                carried = torch.matmul(_grouped(removed, n_rep), v_cols).view(b, h, len(rows), d)
                out = out.index_put((torch.arange(b, device=device)[:, None], rows[None, :]),
                                    out[:, rows] - carried.transpose(1, 2).to(out.dtype))
    return out


def _any_cut_allowed(cuts: Sequence[EdgeCut], rows: Tensor, allowed: Tensor, q_len: int,
                     k_len: int, n_heads: int, device: torch.device) -> bool:
    return any(bool((cut.edges(rows, q_len, k_len, n_heads, device) & allowed).any())
               for cut in cuts)
