"""Logit lens over the image tokens, and hooks that project words out of them.

:func:`image_logit_lens` asks, at every image-side position (the image's content tokens
plus the family's BOI, EOI, row breaks and other image markers) and every layer, how
likely the model would find a few *words* if it stopped there: the residual goes through
the final norm, the unembedding and the family's final transform exactly as in
:func:`~tl_vlm.analyses.logit_lens.logit_lens` (the model's own modules), then a softmax
over the whole vocabulary. It keeps only the probability, the rank and the logit of each
word, computed inside the forward pass a chunk of rows at a time, so a real model's
``[layer, position, vocab]`` lens is never held in memory.

:func:`tokens_in_box` turns a box on the picture into the image tokens it covers, and
:meth:`ImageLensResult.localisation` says which share of a word's probability mass over
the image lies there. :func:`project_away` returns hooks that remove the words'
unembedding directions from the image-side residual stream.

Words map to tokens by tl_vlm's one answer policy (:mod:`tl_vlm.core.answers`): the
first token that carries the word after a space (``" cat"``; a bare ``"▁"`` piece is
skipped). Pass token ids to choose others (e.g. the no-space ``"cat"`` variant: look it
up with ``model.tokenizer.convert_tokens_to_ids``).

Example:
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> batch = model.prepare(make_examples(12, seed=0).prompts)
    >>> lens = image_logit_lens(model, batch, ["red", "square"])
    >>> lens.prob.shape                       # [batch, layer, image-side position, word]
    torch.Size([12, 4, 38, 2])
    >>> lens.kinds                            # which image-side tokens: BOI, 36 codes, EOI
    {'image': 432, 'boi': 12, 'eoi': 12}
    >>> hooks = project_away(model, batch, ["red"], layers=[2])
    >>> cut = image_logit_lens(model, batch, ["red"], layers=[2], point="resid_pre", fwd_hooks=hooks)
    >>> bool(cut.logit.nan_to_num().abs().max() < 1e-4)       # the lens no longer sees "red"
    True
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_vlm.analyses.knockout import Hook, Layers, resolve_layers
from tl_vlm.analyses.logit_lens import final_logit_transform, lens_tolerance
from tl_vlm.core.answers import answer_token_id
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.devices import execution_device, weights_of
from tl_vlm.core.positions import ImagePositions, PositionSet

Word = Union[str, int]
Words = Union[Word, Sequence[Word]]
Box = tuple[float, float, float, float]
Region = Union[PositionSet, Bool[Tensor, "n_image"], Sequence[Bool[Tensor, "n_image_b"]]]

#: the kinds of image-side position, in the order a position is named by
KINDS = ("image", "boi", "eoi", "row_break", "special")
_ROWS_PER_CHUNK = 2**24  # rows x vocab floats of lens logits alive at once (64 MiB in float32)


# -- words ---------------------------------------------------------------------------------
def _vocab_size(model) -> int:
    return int(model.unembed.original_component.weight.shape[0])


def _word_ids(model, words: Words) -> tuple[list[int], list[str]]:
    """Token ids and labels of ``words`` (strings by the answer policy, or token ids)."""
    if isinstance(words, (str, int)) or (isinstance(words, Tensor) and words.ndim == 0):
        words = [words]
    words = list(words.tolist() if isinstance(words, Tensor) else words)
    if not words:
        raise ValueError("words is empty: give at least one word or token id")
    vocab = _vocab_size(model)
    ids, labels = [], []
    for word in words:
        if isinstance(word, str):
            ids.append(answer_token_id(model.tokenizer, word))   # AnswerTokenError: a ValueError
            labels.append(word.strip())
            continue
        try:
            if isinstance(word, bool):
                raise TypeError
            token = operator.index(word)
        except TypeError:
            raise TypeError(f"a word must be a string or a token id, got {word!r}") from None
        if not 0 <= token < vocab:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{vocab - 1})")
        ids.append(token)
        labels.append(str(model.tokenizer.convert_ids_to_tokens(token)))
    return ids, labels


def _positions(batch: VLMBatch, positions: Optional[PositionSet], what: str) -> PositionSet:
    if not isinstance(batch, VLMBatch):
        raise TypeError("pass the VLMBatch from model.prepare(...)")
    pos = batch.positions
    chosen = pos.image_side if positions is None else positions
    pos.check(chosen, what, nonempty=True)
    if bool((chosen.mask & pos.padding.mask.to(chosen.mask.device)).any()):
        raise ValueError(f"{what} include padding positions; subtract batch.positions.padding")
    return chosen


def _kind_codes(pos: ImagePositions) -> Int[Tensor, "batch pos"]:
    """Index into ``KINDS + ("text",)`` of every position (the first kind that holds it)."""
    sets = (pos.image, pos.boi, pos.eoi, pos.row_breaks, pos.specials)
    codes = torch.full(pos.padding.mask.shape, len(KINDS), dtype=torch.long)
    for i, s in reversed(list(enumerate(sets))):
        codes[s.mask.cpu()] = i
    return codes


# -- the lens, a chunk of rows at a time ----------------------------------------------------
def _word_stats(lens, rows: Tensor, ids: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """(prob, rank, logit) of each word at each row, ``[n, words]`` float32 on the CPU;
    ``step`` rows of lens logits at a time."""
    out: list[list[Tensor]] = [[], [], []]
    for start in range(0, rows.shape[0], step):
        with torch.no_grad():
            logits = lens(rows[start:start + step]).float()                  # [r, vocab]
        word = logits[:, ids.to(logits.device)]                               # [r, words]
        out[0].append((word - torch.logsumexp(logits, -1, keepdim=True)).exp().cpu())
        out[1].append(torch.stack([(logits > word[:, i:i + 1]).sum(-1)
                                   for i in range(word.shape[1])], -1).float().cpu())
        out[2].append(word.cpu())
    return tuple(torch.cat(parts) for parts in out)  # type: ignore[return-value]


class _LensReader:
    """A read-only hook: the word statistics of ``act[mask]`` (``lens`` None: none) and,
    with ``keep_rows``, the rows themselves."""

    def __init__(self, lens, mask: Tensor, ids: Tensor, step: int, keep_rows: bool = False) -> None:
        self.lens, self.mask, self.ids, self.step, self.keep_rows = lens, mask, ids, step, keep_rows
        self.stats: Optional[tuple[Tensor, Tensor, Tensor]] = None
        self.rows: Optional[Tensor] = None

    def __call__(self, act: Tensor, hook: Any) -> None:
        rows = act[self.mask.to(act.device)].detach()
        if self.lens is not None:
            self.stats = _word_stats(self.lens, rows, self.ids, self.step)
        if self.keep_rows:
            self.rows = rows
        return None


def _lens_of(model):
    """Residual -> logits, as the model maps its last residual (logit_lens's lens)."""
    norm = model.ln_final.original_component
    unembed = model.unembed.original_component
    transform = final_logit_transform(model)
    return lambda resid: transform(unembed(norm(resid)))


def _check_last(model, model_logits: Tensor, rows: Tensor, mask: Tensor) -> None:
    """The lens of the last residual must be the model's logits (as logit_lens checks)."""
    lens = _lens_of(model)
    b, p = mask.nonzero(as_tuple=True)
    step = max(1, _ROWS_PER_CHUNK // model_logits.shape[-1])
    for start in range(0, rows.shape[0], step):
        with torch.no_grad():
            mine = lens(rows[start:start + step])
        theirs = model_logits[b[start:start + step].to(model_logits.device),
                              p[start:start + step].to(model_logits.device)]
        rtol, atol = lens_tolerance(mine.dtype, logits=True)
        mine = mine.to(theirs.device)
        if theirs.shape != mine.shape or not torch.allclose(mine, theirs, rtol=rtol, atol=atol):
            raise RuntimeError(
                f"the lens of the last residual does not reproduce {type(model.hf_model).__name__}'s "
                f"logits (max |diff| {(mine - theirs).abs().max().item():.3g}): add the transform to "
                f"the family's final_logits, or pass check=False if your fwd_hooks edit the final "
                f"norm or the unembedding")


# -- the result -----------------------------------------------------------------------------
@dataclass(repr=False)
class ImageLensResult:
    """Lens probability, rank and logit of a few words at every image-side position.

    Attributes:
        prob: ``[batch, layer, slot, word]``: softmax probability of the word; NaN where
            the example has fewer image-side positions than ``slot``.
        rank: same shape: how many vocabulary entries have a larger lens logit (0 = the
            top prediction), as floats so that padding can be NaN.
        logit: same shape: the lens logit (after the family's final transform).
        position: ``[batch, slot]`` sequence position of each slot, -1 for padding.
        kind: per example, per slot: ``"image"`` (content), ``"boi"``, ``"eoi"``,
            ``"row_break"`` or ``"special"`` (Emu3's size prefix and EOF, ...); ``"text"``
            only if you passed positions outside the image side.
        image_index: ``[batch, slot]`` index of a content slot in
            ``batch.positions.image[b]``; -1 for the other kinds and for padding.
        n_image: ``[batch]`` content tokens per example (all of them, measured or not).
        layers, point: the model layers of the second axis and the residual read
            (``"resid_post"``: block output; ``"resid_pre"``: block input).
        words, token_ids: the words as labelled and their token ids.
        seq_len: the batch's sequence length.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> lens = image_logit_lens(model, batch, ["red", "blue"], layers=[0, -1])
        >>> print(lens)                                      # doctest: +ELLIPSIS
        ImageLensResult(words ['red', 'blue'], layers [0, 3] (resid_post), 12 examples x 38 image-side positions
          (image 432, boi 12, eoi 12); at layer 3: mean p red ..., blue ...; best rank red ..., blue ...)
        >>> lens.position[0, :3].tolist(), lens.kind[0][:2], lens.kind[0][-1]
        ([1, 2, 3], ['boi', 'image'], 'eoi')
        >>> lens.scores(0, layer=3, word="red").shape        # one per image token: plot.image_scores
        torch.Size([36])
    """

    prob: Float[Tensor, "batch layer slot word"]
    rank: Float[Tensor, "batch layer slot word"]
    logit: Float[Tensor, "batch layer slot word"]
    position: Int[Tensor, "batch slot"]
    kind: list[list[str]]
    image_index: Int[Tensor, "batch slot"]
    n_image: Int[Tensor, "batch"]
    layers: list[int]
    point: str
    words: list[str]
    token_ids: list[int]
    seq_len: int

    @property
    def kinds(self) -> dict[str, int]:
        """How many positions of each kind the result covers (all examples together)."""
        counts = {k: sum(row.count(k) for row in self.kind) for k in KINDS + ("text",)}
        return {k: n for k, n in counts.items() if n}

    def layer_index(self, layer: int) -> int:
        """The index along the layer axis of model layer ``layer`` (negative: from the end
        of :attr:`layers`).

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> lens = image_logit_lens(model, model.prepare(make_examples(2).prompts), "red",
            ...                         layers=[1, 3])
            >>> lens.layer_index(3), lens.layer_index(-1), lens.layer_index(-2)
            (1, 1, 0)
            >>> lens.layer_index(2)
            Traceback (most recent call last):
            ...
            ValueError: layer 2 was not computed (layers [1, 3])
        """
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if layer < 0 and -len(self.layers) <= layer:
            return len(self.layers) + layer
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not computed (layers {self.layers})")
        return self.layers.index(layer)

    def word_index(self, word: Word) -> int:
        """The index along the word axis of ``word`` (its label, token id, or index).

        A plain int is an index into :attr:`words` when it is smaller than their number,
        else a token id.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> lens = image_logit_lens(model, model.prepare(make_examples(2).prompts),
            ...                         ["red", "blue"], layers=[3])
            >>> lens.word_index("blue"), lens.word_index(1), lens.word_index(18)
            (1, 1, 0)
        """
        if isinstance(word, str):
            if word.strip() not in self.words:
                raise ValueError(f"word {word!r} is not among {self.words}")
            return self.words.index(word.strip())
        index = operator.index(word)
        if 0 <= index < len(self.words):
            return index
        if index in self.token_ids:
            return self.token_ids.index(index)
        raise ValueError(f"{word!r} is neither an index into {self.words} nor one of their token "
                         f"ids {self.token_ids}")

    def _metric(self, metric: str) -> Tensor:
        if metric not in ("prob", "rank", "logit"):
            raise ValueError(f"metric must be 'prob', 'rank' or 'logit', got {metric!r}")
        return getattr(self, metric)

    def scores(self, example: int, layer: int = -1, word: Word = 0,
               metric: Literal["prob", "rank", "logit"] = "prob") -> Float[Tensor, "n_image"]:
        """One value per image content token of ``example``, aligned with
        ``batch.positions.image[example]``: what :func:`tl_vlm.plot.image_scores` draws.
        NaN for content tokens the lens did not cover.

        Example:
            >>> from tl_vlm import HookedVLM, plot
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(2).prompts)
            >>> lens = image_logit_lens(model, batch, "red")
            >>> fig = plot.image_scores(model, batch, lens.scores(0, layer=2), score_name="p(red)")
            >>> fig.data[0].z.shape
            (6, 6)
        """
        if not 0 <= example < self.prob.shape[0]:
            raise IndexError(f"example {example} is outside the batch of {self.prob.shape[0]}")
        values = self._metric(metric)[example, self.layer_index(layer), :, self.word_index(word)]
        out = torch.full((int(self.n_image[example]),), float("nan"))
        index = self.image_index[example]
        out[index[index >= 0]] = values[index >= 0]
        return out

    def _inside(self, region: Region) -> Bool[Tensor, "batch slot"]:
        """Which content slots lie in ``region``."""
        content = self.image_index >= 0
        if isinstance(region, PositionSet):
            if tuple(region.mask.shape) != (self.prob.shape[0], self.seq_len):
                raise ValueError(f"region covers {tuple(region.mask.shape)} [batch, pos] but the "
                                 f"lens was computed on ({self.prob.shape[0]}, {self.seq_len})")
            mask = region.mask.cpu()
            return content & mask.gather(1, self.position.clamp_min(0))
        masks = [region] * self.prob.shape[0] if isinstance(region, Tensor) else list(region)
        if len(masks) != self.prob.shape[0]:
            raise ValueError(f"give one boolean mask over the image tokens per example "
                             f"({self.prob.shape[0]}), got {len(masks)}")
        inside = torch.zeros_like(content)
        for b, mask in enumerate(masks):
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool or tuple(mask.shape) != (int(self.n_image[b]),):
                raise ValueError(f"the mask of example {b} must be a boolean tensor over its "
                                 f"{int(self.n_image[b])} image tokens, got {mask.dtype} "
                                 f"{tuple(mask.shape)}")
            index = self.image_index[b]
            inside[b, index >= 0] = mask[index[index >= 0]]
        return inside

    def localisation(self, region: Region, normalise: bool = False) -> Float[Tensor, "batch layer word"]:
        """Share of each word's probability mass over the image's content tokens that
        falls inside ``region``.

        ``share[b, l, w] = sum(prob inside) / sum(prob over content tokens)``: 1 when the
        word is read off the region only. A word spread evenly over the image scores the
        share of tokens inside the region; ``normalise=True`` divides by that share, so
        1 means "no preference" and above 1 "localised in the region". BOI, EOI and row
        breaks do not lie on the picture and count in neither sum.

        Args:
            region: a :class:`PositionSet` of the batch (e.g. :func:`tokens_in_box`), a
                boolean mask over the image tokens (aligned with ``positions.image[b]``,
                the same for every example), or one such mask per example.
            normalise: divide by the share of the example's content tokens inside.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(12, seed=0).prompts)
            >>> lens = image_logit_lens(model, batch, ["red", "blue"])
            >>> top_left = tokens_in_box(model, batch, (0, 0, 3, 3))    # token units: no picture
            >>> share = lens.localisation(top_left)                      # [batch, layer, word]
            >>> share.shape, top_left.counts[0].item()
            (torch.Size([12, 4, 2]), 9)
            >>> whole = torch.ones(36, dtype=torch.bool)
            >>> bool(torch.allclose(lens.localisation(whole), torch.ones(12, 4, 2)))
            True
        """
        inside = self._inside(region)                                     # [batch, slot]
        content = (self.image_index >= 0)
        prob = self.prob.nan_to_num(0.0)
        total = (prob * content[:, None, :, None]).sum(2)
        share = (prob * inside[:, None, :, None]).sum(2) / total
        share[(content.sum(1) == 0)] = float("nan")
        if normalise:
            fraction = inside.sum(1).float() / content.sum(1).clamp_min(1).float()
            share = share / fraction[:, None, None]
        return share

    def plot(self, model, batch: VLMBatch, example: int = 0, layer: int = -1, word: Word = 0,
             images: Any = None, metric: Literal["prob", "rank", "logit"] = "prob", **kwargs: Any):
        """:func:`tl_vlm.plot.image_scores` of :meth:`scores` (other keywords go there).

        Example:
            >>> from tl_vlm import HookedVLM
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(2).prompts)
            >>> fig = image_logit_lens(model, batch, "red").plot(model, batch, layer=2)
            >>> fig.layout.coloraxis.colorbar.title.text
            'p(red), layer 2'
        """
        from tl_vlm import plot

        values = self.scores(example, layer, word, metric)
        label = self.words[self.word_index(word)]
        name = {"prob": f"p({label})", "rank": f"rank of {label}", "logit": f"logit of {label}"}[metric]
        kwargs.setdefault("score_name", f"{name}, layer {self.layers[self.layer_index(layer)]}")
        return plot.image_scores(model, batch, values, example, images, **kwargs)

    def __repr__(self) -> str:
        n_b, _, n_s, _ = self.prob.shape
        kinds = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in self.kinds.items())
        last = self.layers[-1]
        mean = self.prob[:, -1].nanmean(dim=(0, 1)).tolist()
        best = torch.nan_to_num(self.rank[:, -1], nan=float("inf")).amin(dim=(0, 1)).tolist()
        means = ", ".join(f"{w} {m:.3g}" for w, m in zip(self.words, mean))
        ranks = ", ".join(f"{w} {r:.0f}" for w, r in zip(self.words, best))
        return (f"ImageLensResult(words {self.words}, layers {self.layers} ({self.point}), "
                f"{n_b} examples x {n_s} image-side positions\n  ({kinds}); at layer {last}: "
                f"mean p {means}; best rank {ranks})")


# -- the analysis ---------------------------------------------------------------------------
def image_logit_lens(
    model,
    batch: VLMBatch,
    words: Words,
    layers: Layers = "all",
    positions: Optional[PositionSet] = None,
    point: Literal["resid_post", "resid_pre"] = "resid_post",
    fwd_hooks: Sequence[Hook] = (),
    check: bool = True,
) -> ImageLensResult:
    """The logit lens of ``words`` at every image-side position and layer, in one pass.

    At ``blocks.{l}.hook_{point}`` of every chosen layer, each image-side position's
    residual goes through the model's final norm, ``lm_head`` and the family's final
    transform (:func:`~tl_vlm.analyses.logit_lens.final_logit_transform`, as
    :func:`~tl_vlm.analyses.logit_lens.logit_lens` does), then a float32 softmax over the
    whole vocabulary; the probability, rank and logit of each word are kept. The image
    side is every content token plus the family's BOI, EOI, row breaks and other markers
    (``batch.positions.image_side``; :attr:`ImageLensResult.kind` names each).

    Args:
        words: a word, a token id, or a sequence of them. A word is its first token after
            a space (tl_vlm's answer policy); a word the tokenizer only knows as its
            unknown token is refused.
        layers: ``"all"``, an int or a sequence of layer indices.
        positions: another position set of the batch (default ``positions.image_side``).
        point: ``"resid_post"`` (block output; the last layer gives the model's own
            next-token distribution) or ``"resid_pre"`` (block input; layer 0 reads the
            embeddings).
        fwd_hooks: interventions active during the pass (e.g. :func:`project_away`).
        check: verify that the lens of the last residual reproduces the model's logits
            at these positions (it catches a final transform tl_vlm does not know).

    Returns an :class:`ImageLensResult`, ``[batch, layer, slot, word]`` padded with NaN.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> data = make_examples(12, seed=0, questions=["colour"])
        >>> batch = model.prepare(data.prompts)
        >>> lens = image_logit_lens(model, batch, ["red", "green", "blue", "yellow"])
        >>> eoi = [k.index("eoi") for k in lens.kind]                  # the gate's slot
        >>> read = lens.prob[range(12), -1, eoi].argmax(-1)             # last layer, at EOI
        >>> bool((read == torch.tensor(data.labels)).float().mean() > 0.5)
        True
        >>> image_logit_lens(model, batch, ["red", "aubergine"])
        Traceback (most recent call last):
        ...
        tl_vlm.core.answers.AnswerTokenError: answer 'aubergine' is not in the vocabulary ...
        >>> image_logit_lens(model, batch, [10**6])
        Traceback (most recent call last):
        ...
        ValueError: token id 1000000 is outside the vocabulary (0..53)
    """
    chosen = _positions(batch, positions, "positions")
    ids, labels = _word_ids(model, words)
    if point not in ("resid_post", "resid_pre"):
        raise ValueError(f"point must be 'resid_post' or 'resid_pre', got {point!r}")
    layer_list = resolve_layers(model, layers)
    mask = chosen.mask
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    lens, step = _lens_of(model), max(1, _ROWS_PER_CHUNK // _vocab_size(model))
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    readers = {f"blocks.{l}.hook_{point}": _LensReader(lens, mask, ids_t, step) for l in layer_list}
    hooks = list(fwd_hooks) + [(name, r) for name, r in readers.items()]
    if check:
        checker = readers.get(last)
        if checker is None:
            checker = _LensReader(None, mask, ids_t, step)
            hooks.append((last, checker))
        checker.keep_rows = True
    with torch.no_grad():
        kwargs = {} if check else {"logits_to_keep": 1}
        model_logits = model.run_with_hooks(batch, fwd_hooks=hooks, output_attentions=False, **kwargs)
    missing = [name for name, r in readers.items() if r.stats is None]
    if missing:
        raise RuntimeError(f"hook points {missing} did not fire on this model")
    if check:
        _check_last(model, model_logits, checker.rows, mask)
    return _assemble(batch.positions, mask, readers, layer_list, point, labels, ids)


def _assemble(pos: ImagePositions, mask: Tensor, readers: dict, layers: list[int], point: str,
              labels: list[str], ids: list[int]) -> ImageLensResult:
    mask = mask.cpu()
    counts = mask.sum(1)
    n_b, width, n_w = mask.shape[0], int(counts.max()), len(ids)
    b_idx, p_idx = mask.nonzero(as_tuple=True)
    slot = torch.arange(len(b_idx)) - torch.cat([torch.zeros(1, dtype=torch.long),
                                                  counts.cumsum(0)[:-1]])[b_idx]
    out = [torch.full((n_b, len(layers), width, n_w), float("nan")) for _ in range(3)]
    for i, r in enumerate(readers.values()):
        for tensor, values in zip(out, r.stats):
            tensor[b_idx, i, slot] = values
    position = torch.full((n_b, width), -1, dtype=torch.long)
    position[b_idx, slot] = p_idx
    image_index = torch.full((n_b, width), -1, dtype=torch.long)
    image_mask = pos.image.mask.cpu()
    rank_in_image = image_mask.long().cumsum(1) - 1                  # [batch, seq]
    content = image_mask[b_idx, p_idx]
    image_index[b_idx[content], slot[content]] = rank_in_image[b_idx[content], p_idx[content]]
    names = KINDS + ("text",)
    codes = _kind_codes(pos)
    kind = [[names[c] for c in codes[b, position[b, :int(counts[b])]].tolist()] for b in range(n_b)]
    return ImageLensResult(out[0], out[1], out[2], position, kind, image_index,
                           image_mask.sum(1), layers, point, labels, ids, int(mask.shape[1]))


# -- regions on the picture -----------------------------------------------------------------
def _box(box: Any) -> Box:
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"a box is (x0, y0, x1, y1), got {box!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values) \
            or values[0] >= values[2] or values[1] >= values[3]:
        raise ValueError(f"a box is (x0, y0, x1, y1) with x0 < x1 and y0 < y1, finite, got {box!r}")
    return values  # type: ignore[return-value]


def tokens_in_box(model, batch: VLMBatch, box: Union[Box, Sequence[Box]], images: Any = None,
                  image: Optional[int] = None, min_overlap: float = 0.5) -> PositionSet:
    """The image content tokens whose cell lies mostly inside ``box``, per example.

    A token is inside when at least ``min_overlap`` of its cell's area is: cells are
    where the family's processor put each token on the picture
    (:func:`tl_vlm.plot.token_boxes`: a centre crop, a padded square, anyres tiles...).

    Args:
        box: ``(x0, y0, x1, y1)`` in the picture's pixels (x to the right, y down), the
            same for every example, or one box per example. In token units (columns,
            rows) when ``images`` is None.
        images: the pictures as given to ``prepare``, one entry per example (a picture, or
            a list of an example's pictures in prompt order); a single picture for a
            one-example batch. None: boxes in token units.
        image: only this image of each example (default: the box applies to each image).
        min_overlap: the share of a token's cell that must be inside (0 < x <= 1).

    Returns a :class:`~tl_vlm.core.positions.PositionSet` of the batch, for
    :meth:`ImageLensResult.localisation` or any analysis taking positions.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(2).prompts)
        >>> tokens_in_box(model, batch, (0, 0, 2, 1))[0].tolist()     # row 0, columns 0-1
        [2, 3]
        >>> tokens_in_box(model, batch, (0, 0, 2, 0.4)).counts.tolist()  # under half a cell
        [0, 0]
        >>> tokens_in_box(model, batch, (3, 0, 1, 1))
        Traceback (most recent call last):
        ...
        ValueError: a box is (x0, y0, x1, y1) with x0 < x1 and y0 < y1, finite, got (3, 0, 1, 1)
    """
    from tl_vlm.plot import token_boxes   # plotly-free: placement only

    if not isinstance(batch, VLMBatch):
        raise TypeError("pass the VLMBatch from model.prepare(...)")
    n = len(batch)
    many = (isinstance(box, Tensor) and box.ndim == 2) or (
        isinstance(box, (list, tuple)) and len(box) > 0 and isinstance(box[0], (list, tuple, Tensor)))
    boxes = [_box(b) for b in box] if many else [_box(box)] * n
    if len(boxes) != n:
        raise ValueError(f"give one box for every example or one per example ({n}), got {len(boxes)}")
    if not 0 < min_overlap <= 1:
        raise ValueError(f"min_overlap must be in (0, 1], got {min_overlap}")
    if images is not None and n == 1 and not isinstance(images, (list, tuple)):
        images = [images]
    if images is not None and len(images) != n:
        raise ValueError(f"give the pictures of every example ({n}), as given to prepare; got "
                         f"{len(images)}")
    pos = batch.positions
    mask = torch.zeros(pos.padding.mask.shape, dtype=torch.bool)
    for b in range(n):
        if pos.n_images(b) == 0:
            continue
        cells = token_boxes(model, batch, b, None if images is None else images[b])
        x0, y0, x1, y1 = boxes[b]
        w = (cells[:, 2].clamp(max=x1) - cells[:, 0].clamp(min=x0)).clamp_min(0)
        h = (cells[:, 3].clamp(max=y1) - cells[:, 1].clamp(min=y0)).clamp_min(0)
        area = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
        inside = (w * h >= min_overlap * area - 1e-9) & ~cells.isnan().any(-1)   # NaN: not placed
        if image is not None:
            inside &= pos.grid[b][:, 0].cpu() == image
        mask[b, pos.image[b].cpu()[inside]] = True
    return PositionSet(mask)


# -- projecting words out --------------------------------------------------------------------
def _norm_gain(model) -> tuple[Tensor, bool]:
    """(gain ``[d_model]``, centres?) of the final norm: what it multiplies a normalised
    residual by, read from the module (Llama's ``w``, Gemma's ``1 + w``, LayerNorm's ``w``)."""
    norm = model.ln_final.original_component
    if isinstance(norm, torch.nn.LayerNorm):
        with weights_of(norm):
            w = norm.weight
            return (torch.ones(norm.normalized_shape) if w is None else w.detach().float().cpu()), True
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    param = next(norm.parameters(), None)
    if eps is None or param is None:
        raise NotImplementedError(f"cannot read the gain of {type(norm).__name__}; pass "
                                  f"fold_norm=False to project the raw unembedding directions")
    device = execution_device(norm) or torch.device("cpu")
    d = param.shape[-1]
    with torch.no_grad():
        gain = norm(torch.ones(1, d, dtype=param.dtype, device=device)).float()[0] * math.sqrt(1 + eps)
        x = torch.randn(3, d, generator=torch.Generator().manual_seed(0)).to(device, param.dtype)
        expected = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * gain
        actual = norm(x).float()
        if torch.allclose(actual, expected, rtol=1e-2, atol=1e-2):
            return gain.cpu(), False
        # A LayerNorm written out (Cohere's): (x - mean x) * rsqrt(var x + eps) * w (+ b).
        with weights_of(norm):
            w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
            if isinstance(w, Tensor):
                centred = x.float() - x.float().mean(-1, keepdim=True)
                expected = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) \
                    * w.detach().float() + (b.detach().float() if isinstance(b, Tensor) else 0.0)
                if torch.allclose(actual, expected, rtol=1e-2, atol=1e-2):
                    return w.detach().float().cpu(), True
    raise NotImplementedError(f"{type(norm).__name__} is neither x * rsqrt(mean x^2 + eps) * g "
                              f"nor a LayerNorm; pass fold_norm=False")


def _word_basis(model, ids: list[int], fold_norm: bool) -> Float[Tensor, "d_model k"]:
    """An orthonormal basis (float64, CPU) of the words' unembedding directions."""
    with weights_of(model.unembed.original_component) as unembed:
        directions = unembed.weight[torch.as_tensor(ids).to(unembed.weight.device)].detach()
        directions = directions.double().cpu()                                   # [k, d]
    if fold_norm:
        gain, centre = _norm_gain(model)
        directions = directions * gain.double()
        if centre:
            directions = directions - directions.mean(-1, keepdim=True)
    u, s, _ = torch.linalg.svd(directions.T, full_matrices=False)
    keep = s > s.max() * 1e-6
    if not bool(keep.any()):
        raise ValueError("the words' unembedding directions are all zero: nothing to project away")
    return u[:, keep]


class _ProjectAway:
    """Forward hook: ``x - Q Q^T x`` at the masked positions, other positions untouched."""

    def __init__(self, basis: Tensor, mask: Tensor) -> None:
        self.basis, self.mask, self.calls = basis, mask, 0

    def __call__(self, act: Tensor, hook: Any) -> Tensor:
        n_b, seq = self.mask.shape
        if act.ndim != 3 or act.shape[0] != n_b:
            raise ValueError(f"project_away hooks need a residual [batch={n_b}, pos, d_model], got "
                             f"{tuple(act.shape)}")
        if act.shape[1] != seq:
            if self.calls and act.shape[1] < seq:
                return act                # a cached generation step: new tokens are text
            raise ValueError(f"the residual has {act.shape[1]} positions but the batch has {seq}: "
                             f"the hooks were built for another batch")
        mask = self.mask.to(act.device)
        q = self.basis.to(device=act.device, dtype=torch.float32)
        rows = act[mask].float()
        out = act.clone()
        out[mask] = (rows - (rows @ q) @ q.T).to(act.dtype)
        self.calls += 1
        return out


def project_away(
    model,
    batch: VLMBatch,
    words: Words,
    layers: Layers,
    positions: Optional[PositionSet] = None,
    point: Literal["resid_pre", "resid_post"] = "resid_pre",
    fold_norm: bool = True,
) -> list[Hook]:
    """Hooks that remove the words' unembedding directions from the image-side residuals.

    At ``blocks.{l}.hook_resid_pre`` (the input of block ``l``; ``point="resid_post"``:
    its output) of each chosen layer, the residual of every image-side position (or of
    ``positions``) loses its component in the span of the words' directions: ``x - Q Q^T
    x`` with ``Q`` an orthonormal basis of that span. Text positions are returned
    bit-identical. The directions are the ``lm_head`` rows of the words' tokens times the
    final norm's gain (TransformerLens's ``fold_ln`` convention; centred for a LayerNorm),
    so the lens logit of every word at a projected position becomes exactly the
    unembedding bias (0 when there is none): the lens no longer sees the words there.
    ``fold_norm=False`` projects the raw ``lm_head`` rows.

    For ``run_with_hooks``, ``model.hooks`` and ``generate(fwd_hooks=...)`` (tokens
    generated later are text: untouched). Words follow :func:`image_logit_lens`.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> hooks = project_away(model, batch, ["red", "blue"], layers=[1, 2])
        >>> [name for name, _ in hooks]
        ['blocks.1.hook_resid_pre', 'blocks.2.hook_resid_pre']
        >>> logits = model.run_with_hooks(batch, fwd_hooks=hooks)
        >>> project_away(model, batch, "red", layers=[7])
        Traceback (most recent call last):
        ...
        IndexError: layer 7 is outside the model's 4 layers (0..3)
    """
    chosen = _positions(batch, positions, "positions")
    ids, _ = _word_ids(model, words)
    if point not in ("resid_pre", "resid_post"):
        raise ValueError(f"point must be 'resid_pre' or 'resid_post', got {point!r}")
    layer_list = resolve_layers(model, layers)
    basis = _word_basis(model, ids, fold_norm)
    return [(f"blocks.{l}.hook_{point}", _ProjectAway(basis, chosen.mask)) for l in layer_list]
