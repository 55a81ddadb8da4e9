"""Logit lens at any position set, and per-head direct logit attribution.

:func:`logit_lens` reads the residual stream at any positions (image tokens included)
and maps it to the vocabulary exactly as the model maps its last residual: the final
norm (the HF module itself), the unembedding, then the family's own final transform
(:func:`final_logit_transform`; Chameleon, for example, sets the logits of its image
vocabulary to the dtype's minimum). Applied to the last layer's ``hook_resid_post`` it
reproduces the model's logits.

:func:`head_logit_attribution` splits the attention output of every head into its
direct effect on an answer logit (minus a baseline logit), TransformerLens's "direct
logit attribution": the head's output ``z_h @ W_O[:, h]^T`` goes through the final norm
with the norm's scale frozen at the final residual (``cache.apply_ln_to_stack``'s
convention). Where a block renormalises the attention output before the residual add
(Gemma 3, Chameleon-30B's ``swin_norm``: a post-attention norm mapped to ``ln1_post``),
that norm's scale is frozen at the layer's whole attention output too, so the heads
(plus the o-projection bias) still add up exactly to what the layer adds to the residual.

Example:
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> data = make_examples(12, seed=0)
    >>> batch = model.prepare(data.prompts)
    >>> lens = logit_lens(model, batch, batch.positions.last)        # [layer, n, vocab]
    >>> values, ids = lens.top_k(1)
    >>> bool((ids[-1, :, 0] == torch.tensor(data.answer_ids)).all())  # last layer: the answers
    True
    >>> dla = head_logit_attribution(model, batch, data.answer_ids)   # [batch, layer, head]
    >>> dla.shape
    torch.Size([12, 4, 4])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.core.devices import execution_device, weights_of
from tl_vlm.analyses.knockout import Layers, resolve_layers
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.positions import PositionSet

TokenIds = Union[int, Sequence[int], Int[Tensor, "batch"]]


# -- the model's own final transform ---------------------------------------------------
def final_logit_transform(model) -> Callable[[Tensor], Tensor]:
    """What the model does to ``lm_head``'s output before returning logits (often nothing).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")    # Chameleon: image codes are masked
        >>> out = final_logit_transform(model)(torch.zeros(1, model.cfg.d_vocab))
        >>> int((out == torch.finfo(out.dtype).min).sum())    # the toy's 24 VQ code tokens
        24
    """
    # Declared per family (Family.final_logits, in the family's adapter file). In
    # transformers 5.23 only Chameleon has one (it masks its image vocabulary);
    # Gemma3ForConditionalGeneration does not soft-cap. The self-check in logit_lens
    # raises if a future version adds a transform that is not declared.
    make = model.family.final_logits
    return make(model) if make is not None else (lambda logits: logits)


def _unembed(model, normed: Tensor) -> Tensor:
    return model.unembed.original_component(normed)


# -- collecting the selected rows of hooked activations --------------------------------
def _gather(model, batch: VLMBatch, rows: dict[str, PositionSet], fwd_hooks=()) -> tuple:
    """Run ``batch`` once; keep ``act[mask]`` (``[n, ...]``, example-major) per hook name."""
    kept: dict[str, Tensor] = {}

    def make(name: str, mask: Tensor):
        def keep(act: Tensor, hook) -> None:  # keyed by the asked name, not the alias's
            kept[name] = act[mask.to(act.device)].detach()
        return keep

    hooks = list(fwd_hooks) + [(name, make(name, s.mask)) for name, s in rows.items()]
    with torch.no_grad():
        logits = model.run_with_hooks(batch, fwd_hooks=hooks)
    missing = [n for n in rows if n not in kept]
    if missing:
        raise RuntimeError(f"hook points {missing} did not fire on this model")
    return logits, kept


def _check_positions(batch: VLMBatch, positions: PositionSet, what: str = "positions") -> None:
    if not isinstance(batch, VLMBatch):
        raise TypeError("pass the VLMBatch from model.prepare(...)")
    batch.positions.check(positions, what, nonempty=True)
    if bool((positions.mask & batch.positions.padding.mask.to(positions.mask.device)).any()):
        raise ValueError(f"{what} include padding positions; subtract batch.positions.padding")


# -- logit lens ------------------------------------------------------------------------
@dataclass
class LogitLensResult:
    """Lens logits of selected positions, one row per (example, position) pair.

    Attributes:
        logits: ``[layer, n, vocab]`` (or ``[layer, n, len(token_ids)]``); row ``i`` is
            position ``position[i]`` of example ``example[i]``, example-major.
        layers: the layer of each first-axis entry.
        example, position: ``[n]`` where each row comes from.
        point: ``"resid_post"`` (row ``l`` = output of block ``l``) or ``"resid_pre"``.
        token_ids: the vocabulary columns kept (None: all).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0).prompts)
        >>> lens = logit_lens(model, batch, batch.positions.image, layers=[-1],
        ...                   apply_final_transform=False)
        >>> lens.logits.shape, lens.layers, lens.point             # 12 examples x 36 codes
        (torch.Size([1, 432, 54]), [3], 'resid_post')
        >>> lens.example[35:38].tolist(), lens.position[35:38].tolist()
        ([0, 1, 1], [37, 2, 3])
        >>> lens.for_example(1).shape                              # [layer, n_b, vocab]
        torch.Size([1, 36, 54])
    """

    logits: Float[Tensor, "layer n vocab"]
    layers: list[int]
    example: Int[Tensor, "n"]
    position: Int[Tensor, "n"]
    point: str
    token_ids: Optional[list[int]] = None

    def for_example(self, example: int) -> Float[Tensor, "layer n_b vocab"]:
        """The rows of one example (its positions in ascending order)."""
        return self.logits[:, (self.example == example).to(self.logits.device)]

    def top_k(self, k: int = 5) -> tuple[Float[Tensor, "layer n k"], Int[Tensor, "layer n k"]]:
        """Top-``k`` logits and their token ids (vocabulary ids even with ``token_ids``)."""
        values, idx = self.logits.topk(k, dim=-1)
        if self.token_ids is not None:
            idx = torch.as_tensor(self.token_ids, device=idx.device)[idx]
        return values, idx


def logit_lens(
    model,
    batch: VLMBatch,
    positions: PositionSet,
    layers: Layers = "all",
    point: Literal["resid_post", "resid_pre"] = "resid_post",
    token_ids: Optional[Sequence[int]] = None,
    apply_final_transform: bool = True,
    fwd_hooks: Sequence[tuple] = (),
    check: bool = True,
) -> LogitLensResult:
    """The logit lens at ``positions``: final norm + unembedding + the model's final transform.

    The residual of every chosen layer (``blocks.{l}.hook_{point}``) at every selected
    position goes through the model's own final norm module and ``lm_head``, then the
    family's final transform (:func:`final_logit_transform`). Position sets are ragged,
    so the result has one row per selected (example, position) pair, example-major:
    ``result.logits[l, i]`` is position ``result.position[i]`` of example
    ``result.example[i]``.

    Args:
        positions: any position set of ``batch`` (image tokens included).
        layers: ``"all"``, an int or a sequence of layer indices.
        point: ``"resid_post"`` (block output; the last one gives the model's logits) or
            ``"resid_pre"`` (block input; layer 0 is the embedding).
        token_ids: keep only these vocabulary columns (memory: the full result is
            ``layers x n x vocab`` floats).
        apply_final_transform: False to skip the family transform (e.g. to see which
            Chameleon image token the lens predicts; the model itself masks them).
        fwd_hooks: interventions active during the run (e.g. knockout hooks).
        check: compare the lens of the last residual with the model's own logits at
            these positions and raise if they differ (a final transform tl_vlm lacks).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> data = make_examples(12, seed=0)
        >>> batch = model.prepare(data.prompts)
        >>> lens = logit_lens(model, batch, batch.positions.last)
        >>> values, ids = lens.top_k(5)                            # [layer, n, 5]
        >>> ids.shape
        torch.Size([4, 12, 5])
        >>> model.layout.tokenizer.convert_ids_to_tokens(ids[-1, 0, :1]), data.answers[0]
        (['yellow'], 'yellow')
        >>> colours = model.layout.tokenizer.convert_tokens_to_ids(["red", "green", "blue", "yellow"])
        >>> logit_lens(model, batch, batch.positions.gate, token_ids=colours).logits.shape
        torch.Size([4, 12, 4])
        >>> logit_lens(model, batch, batch.positions.row_breaks)
        Traceback (most recent call last):
        ...
        ValueError: positions is empty in every example (...)
    """
    _check_positions(batch, positions)
    if point not in ("resid_post", "resid_pre"):
        raise ValueError(f"point must be 'resid_post' or 'resid_pre', got {point!r}")
    chosen = resolve_layers(model, layers)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    rows = {f"blocks.{l}.hook_{point}": positions for l in chosen}
    if check:
        rows[last] = positions
    model_logits, kept = _gather(model, batch, rows, fwd_hooks)
    model_transform = final_logit_transform(model)
    transform = model_transform if apply_final_transform else (lambda x: x)
    norm = model.ln_final.original_component
    cols = None if token_ids is None else torch.as_tensor(list(token_ids), dtype=torch.long)

    def lens(resid: Tensor) -> Tensor:
        with torch.no_grad():
            out = transform(_unembed(model, norm(resid)))
        return out if cols is None else out[..., cols.to(out.device)]

    if check:
        with torch.no_grad():
            mine = model_transform(_unembed(model, norm(kept[last])))
        theirs = model_logits[positions.mask.to(model_logits.device)]
        rtol, atol = lens_tolerance(mine.dtype, logits=True)
        if theirs.shape != mine.shape or not torch.allclose(mine, theirs, rtol=rtol, atol=atol):
            raise RuntimeError(
                f"the lens of the last residual does not reproduce {type(model.hf_model).__name__}'s "
                f"logits (max |diff| {(mine - theirs).abs().max().item():.3g}): its forward "
                f"transforms lm_head's output in a way tl_vlm does not know; add it to "
                f"the family's final_logits in its tl_vlm/adapters file (or pass check=False if "
                f"your fwd_hooks edit the final norm or unembedding)"
            )
    # Layers split over devices give residuals on several devices: stack where logits live.
    home = execution_device(model.unembed.original_component) or torch.device("cpu")
    logits = torch.stack([lens(kept[f"blocks.{l}.hook_{point}"]).to(home) for l in chosen])
    nz = positions.mask.nonzero()
    return LogitLensResult(logits, chosen, nz[:, 0].cpu(), nz[:, 1].cpu(), point,
                           None if cols is None else cols.tolist())


def lens_tolerance(dtype: torch.dtype, logits: bool = False) -> tuple[float, float]:
    """(rtol, atol) for "the same computation": half precision rounds per op (bf16 ulp at a
    logit of 30 is 0.125), so a transform is only flagged when it changes much more.

    Example:
        >>> lens_tolerance(torch.float32), lens_tolerance(torch.bfloat16, logits=True)
        ((0.001, 0.0001), (0.01, 0.5))
    """
    if dtype in (torch.float32, torch.float64):
        return 1e-3, 1e-4
    return (1e-2, 0.5) if logits else (2e-2, 2e-2)


# -- direct logit attribution ----------------------------------------------------------
def _frozen_rms(module: torch.nn.Module, x_ref: Float[Tensor, "n d"]) -> tuple[Tensor, bool]:
    """``(m, centred)``: per-row multiplier ``m`` with ``module(y) == c(y) * m`` (plus the
    norm's bias, if any) when the scale is frozen at ``x_ref``; ``c`` centres ``y``
    (subtracts its mean) when ``centred``, else is the identity.

    Works for every RMSNorm form ``x * rsqrt(mean(x^2) + eps) * g`` (Llama's ``w``, Gemma's
    ``1 + w``: ``g`` is read by normalising a vector of ones) and for LayerNorm forms
    ``(x - mean x) * rsqrt(var x + eps) * w (+ b)`` (``torch.nn.LayerNorm``, Cohere's); the
    result is checked against ``module(x_ref)``.
    """
    name = type(module).__name__
    eps = getattr(module, "variance_epsilon", None)
    eps = getattr(module, "eps", None) if eps is None else eps
    if eps is None:
        raise NotImplementedError(
            f"direct logit attribution needs an RMSNorm or LayerNorm form (x * rsqrt(mean x^2 "
            f"+ eps) * g, or the same of x - mean x); {name} has no eps")
    d = x_ref.shape[-1]
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None else x_ref.dtype
    rtol, atol = lens_tolerance(x_ref.dtype)
    with torch.no_grad():
        x = x_ref.float()
        actual = module(x_ref).float()
        if not isinstance(module, torch.nn.LayerNorm):
            ones = torch.ones(1, d, dtype=dtype, device=x_ref.device)
            gain = module(ones).float()[0] * math.sqrt(1.0 + float(eps))
            mult = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(eps)) * gain
            if torch.allclose(x * mult, actual, rtol=rtol, atol=atol):
                return mult, False
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        gain = torch.ones(d, device=x.device) if weight is None else weight.detach().float()
        centred = x - x.mean(-1, keepdim=True)
        mult = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + float(eps)) * gain
        shift = 0.0 if not isinstance(bias, Tensor) else bias.detach().float()
        if torch.allclose(centred * mult + shift, actual, rtol=rtol, atol=atol):
            return mult, True
    raise NotImplementedError(
        f"{name} is neither x * rsqrt(mean x^2 + eps) * g nor (x - mean x) * rsqrt(var x + "
        f"eps) * w (+ b); direct logit attribution through it is not supported")


def _through_norm(direction: Tensor, frozen: tuple[Tensor, bool]) -> Tensor:
    """A read-out direction pulled back through a frozen norm (:func:`_frozen_rms`): the
    norm is linear then, and a centring norm's transpose centres too."""
    mult, centred = frozen
    direction = direction * mult
    return direction - direction.mean(-1, keepdim=True) if centred else direction


def _token_tensor(tokens: TokenIds, n: int, what: str) -> Tensor:
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(n)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{what} must be one token id or one per example ({n}), got shape "
                         f"{tuple(t.shape)}")
    return t


@torch.no_grad()
def head_logit_attribution(
    model,
    batch: VLMBatch,
    answer_tokens: TokenIds,
    positions: Optional[PositionSet] = None,
    layers: Layers = "all",
    baseline_tokens: Optional[TokenIds] = None,
    fwd_hooks: Sequence[tuple] = (),
) -> Float[Tensor, "batch layer head"]:
    """Direct logit attribution of every attention head toward ``answer_tokens``.

    ``out[b, i, h]`` is head ``h`` of layer ``layers[i]``: its output at example ``b``'s
    position, ``z_h @ W_O[:, h * d_head:(h + 1) * d_head]^T`` (``z`` = ``attn.hook_z``,
    ``W_O`` = the o-projection weight), mapped through the final norm with its scale
    frozen at the final residual (and centred, for a LayerNorm such as Aya Vision's
    Cohere2 decoder has), dotted with ``W_U[answer] - W_U[baseline]`` (TL's
    ``apply_ln_to_stack`` convention). Blocks with a post-attention norm (``ln1_post``,
    Gemma 3) get that norm's scale frozen at the layer's whole attention output, so for
    every family ``out[b, i].sum() + bias term`` equals the direct attribution of what the
    layer's attention adds to the residual. The o-projection bias (if any) belongs to no
    head and is left out, as is a final LayerNorm's bias; the unembedding bias and the
    family's final transform (e.g.
    Chameleon's image-vocabulary mask) are not linear attributions and are left out too.

    Args:
        answer_tokens: one token id, or one per example.
        positions: exactly one position per example (default: the last token).
        layers: ``"all"``, an int or a sequence of layer indices.
        baseline_tokens: subtract this token's direction (logit difference), or None.
        fwd_hooks: interventions active during the run.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> batch = model.prepare(make_examples(12, seed=0, questions=["colour"]).prompts)
        >>> tok = model.layout.tokenizer
        >>> dla = head_logit_attribution(model, batch, tok.convert_tokens_to_ids("red"),
        ...                              baseline_tokens=tok.convert_tokens_to_ids("blue"))
        >>> dla.mean(0).shape                                      # [layer, head]
        torch.Size([4, 4])
        >>> two = batch.positions.gate | batch.positions.last
        >>> head_logit_attribution(model, batch, 7, positions=two)
        Traceback (most recent call last):
        ...
        ValueError: head_logit_attribution needs exactly one position per example, got ...
    """
    if not isinstance(batch, VLMBatch):
        raise TypeError("pass the VLMBatch from model.prepare(...)")
    positions = batch.positions.last if positions is None else positions
    _check_positions(batch, positions)
    counts = positions.counts
    if not bool((counts == 1).all()):
        raise ValueError(
            f"head_logit_attribution needs exactly one position per example, got counts "
            f"{counts.tolist()}; pick one (e.g. batch.positions.last) or loop over positions"
        )
    n_batch = len(batch)
    answer = _token_tensor(answer_tokens, n_batch, "answer_tokens")
    vocab = model.unembed.original_component.weight.shape[0]
    if bool((answer < 0).any() or (answer >= vocab).any()):
        raise IndexError(f"answer_tokens {answer.tolist()} outside the vocabulary (0..{vocab - 1})")
    chosen = resolve_layers(model, layers)
    post = {l: hasattr(model.blocks[l], "ln1_post") for l in chosen}
    rows = {"ln_final.hook_in": positions}
    for l in chosen:
        rows[f"blocks.{l}.attn.hook_z"] = positions
        if post[l]:
            rows[f"blocks.{l}.ln1_post.hook_in"] = positions
    _, kept = _gather(model, batch, rows, fwd_hooks)

    with weights_of(model.unembed.original_component) as unembed:  # offloaded: meta outside
        w_u = unembed.weight
        direction = w_u[answer.to(w_u.device)].float()                            # [b, d]
        if baseline_tokens is not None:
            base = _token_tensor(baseline_tokens, n_batch, "baseline_tokens")
            if bool((base < 0).any() or (base >= vocab).any()):
                raise IndexError(f"baseline_tokens {base.tolist()} outside the vocabulary")
            direction = direction - w_u[base.to(w_u.device)].float()
    direction = _through_norm(direction, _frozen_rms(model.ln_final.original_component,
                                                     kept["ln_final.hook_in"]))   # [b, d]

    out = []
    for l in chosen:
        z = kept[f"blocks.{l}.attn.hook_z"].float()                                # [b, h, k]
        with weights_of(model.blocks[l].attn.o.original_component) as o_proj:
            w_o = o_proj.weight.float()                                            # [d, h*k]
        w_o = w_o.view(w_o.shape[0], z.shape[1], z.shape[2])                       # [d, h, k]
        d_l = direction
        if post[l]:
            d_l = _through_norm(d_l, _frozen_rms(model.blocks[l].ln1_post.original_component,
                                                 kept[f"blocks.{l}.ln1_post.hook_in"]))
        out.append(torch.einsum("bhk,dhk,bd->bh", z, w_o.to(z.device), d_l.to(z.device)))
    return torch.stack(out, dim=1)
