"""The generic path: a checkpoint with no family file, mapped from what it shows.

When no family in :mod:`tl_vlm.adapters` claims a checkpoint's architecture,
:func:`tl_vlm.core.family.family_for_config` asks :func:`generic_family` whether the
checkpoint can still be loaded: a transformers image-text-to-text model whose text
decoder TransformerLens can map and whose processor marks its image tokens.

**The decoder** (:func:`plan_decoder`, from the config alone, before any weight is read):
the model is built on the ``meta`` device and its module tree read. The input
embedding's parent is the decoder; it must hold one list of ``num_hidden_layers``
layers of one class, one RMSNorm (the final norm) and nothing else with parameters;
each layer must be Llama-style (``self_attn``, ``mlp``, ``input_layernorm``,
``post_attention_layernorm``) or Gemma-style (the same plus ``pre_feedforward_layernorm``
and ``post_feedforward_layernorm``), with ``q_proj``/``k_proj``/``v_proj``/``o_proj``
(and optional ``q_norm``/``k_norm``) in an attention that calls transformers' attention
interface, and a gated MLP (``gate_proj``/``up_proj``/``down_proj``). :class:`GenericAdapter`
maps exactly that, and routes attention through tl_vlm's hooked attention.

**The image tokens** (:class:`GenericLayout`, from the processor, before any weight is
read): the processor is run once on a probe prompt (text, placeholder, text,
placeholder, text) with two small pictures of different shapes, and its output read:

- content: the config's ``image_token_id`` (or ``image_token_index``), which must equal
  the processor's ``image_token_id``; the processor's ``image_token`` is the placeholder;
- BOI/EOI: the token right before / after each image's content, when it is one the
  processor marks as an image token (``image_token_ids``, ``mm_token_type_ids``) or a
  special token the processor put there (not one of the prompt's own); the same for
  every image, or none;
- other marked tokens inside an image's run (tile or row separators): ``specials``;
- rows: from ``image_grid_thw`` (divided by the merge size) or ``image_sizes``
  (divided by the processor's ``patch_size`` times its ``spatial_merge_size``) when the processor
  reports one of them and it agrees with the run lengths, else one row (1-D).

Every load logs one line saying that the generic path was taken and what it inferred
(:attr:`GenericLayout.notice`). Whatever cannot be inferred for certain is refused with
:class:`GenericPathError` (an :class:`~tl_vlm.core.family.UnsupportedModelError`): what is
missing, and that a family file (CONTRIBUTING.md, "Adding a family") is what to write.
Named families always win; nothing here names one.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
from transformer_lens.model_bridge.generalized_components import (
    BlockBridge,
    EmbeddingBridge,
    RMSNormalizationBridge,
    RotaryEmbeddingBridge,
    UnembeddingBridge,
)

from tl_vlm.core.attention_bridge import use_hooked_attention
from tl_vlm.core.family import Family, UnsupportedModelError
from tl_vlm.core.layout import GridQueue, ImageLayout, LayoutError, RowLayout, runs

logger = logging.getLogger("tl_vlm")

ADD_A_FAMILY = 'CONTRIBUTING.md, "Adding a family"'
LLAMA_LAYER = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})
GEMMA_LAYER = LLAMA_LAYER | {"pre_feedforward_layernorm", "post_feedforward_layernorm"}
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = frozenset({"gate_proj", "up_proj", "down_proj"})
#: processor attributes that may hold the string a prompt writes for one image, tried in order
PLACEHOLDER_ATTRIBUTES = ("image_token", "image_placeholder_token")
#: the probe prompt's words around the placeholders
PROBE_WORD = "a"


class GenericPathError(UnsupportedModelError):
    """The checkpoint has no family file and the generic path cannot map it for certain.

    Example:
        >>> raise refusal("XForConditionalGeneration", "its decoder layers are of 2 kinds",
        ...               "map each kind of layer in its adapter")
        Traceback (most recent call last):
        ...
        tl_vlm.core.generic.GenericPathError: tl_vlm has no family file for XForConditionalGeneration, ...
    """


def refusal(model: str, missing: str, write: str) -> GenericPathError:
    """The generic path's refusal: what is missing, and the family file to write."""
    return GenericPathError(
        f"tl_vlm has no family file for {model}, and its generic path cannot load it: "
        f"{missing}. Write a family file, tl_vlm/adapters/<name>.py ({ADD_A_FAMILY}), "
        f"that will {write}.")


# -- the decoder ----------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderPlan:
    """Module paths of the text decoder, read from the model's module tree.

    Example:
        >>> plan = DecoderPlan("XForConditionalGeneration", "x", "model.language_model.embed_tokens",
        ...                    "model.language_model.layers", 2, "model.language_model.norm",
        ...                    "lm_head", None, False, True, False, "Qwen3DecoderLayer")
        >>> plan.describe()
        'decoder = 2 Llama-style Qwen3DecoderLayer at model.language_model.layers (q/k norms)'
    """

    architecture: str
    model_type: str
    embed: str
    layers: str
    n_layers: int
    final_norm: str
    lm_head: str
    rotary: Optional[str]
    sandwich: bool          # Gemma-style: a norm before and after each sublayer
    qk_norm: bool
    norm_offset: bool       # RMSNorm scales by (1 + weight)
    layer_class: str

    def describe(self) -> str:
        style = "Gemma-style" if self.sandwich else "Llama-style"
        extra = " (q/k norms)" if self.qk_norm else ""
        return f"decoder = {self.n_layers} {style} {self.layer_class} at {self.layers}{extra}"


def _has_parameters(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return "rmsnorm" in type(module).__name__.lower()


def _children_with_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: child for name, child in module.named_children() if _has_parameters(child)}


def _source(function: Any) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def image_text_to_text_class(hf_config: Any) -> Optional[str]:
    """The transformers image-text-to-text class the config's ``architectures`` names, or
    None when it names none (the generic path does not apply).

    Example:
        >>> from transformers import VipLlavaConfig, BertConfig
        >>> image_text_to_text_class(VipLlavaConfig(architectures=["VipLlavaForConditionalGeneration"]))
        'VipLlavaForConditionalGeneration'
        >>> image_text_to_text_class(BertConfig(architectures=["BertModel"])) is None
        True
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    archs = list(getattr(hf_config, "architectures", None) or [])
    expected = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(getattr(hf_config, "model_type", None))
    names = [expected] if isinstance(expected, str) else list(expected or [])
    return next((a for a in archs if a in names), None)


def meta_model(hf_config: Any) -> torch.nn.Module:
    """The image-text-to-text model of ``hf_config`` on the ``meta`` device (no memory,
    no weights): the module tree TransformerLens will wrap."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(copy.deepcopy(hf_config))
    finally:
        hf_logging.set_verbosity(verbosity)


def plan_decoder(hf_config: Any) -> DecoderPlan:
    """Read the text decoder's module paths from the model built on the meta device, or
    refuse (:class:`GenericPathError`) when it is not a decoder the generic adapter maps.

    Example:
        >>> from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig
        >>> cfg = VipLlavaConfig(text_config=LlamaConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, vocab_size=64),
        ...     vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4), vision_feature_layers=[-1, -2],
        ...     architectures=["VipLlavaForConditionalGeneration"])
        >>> plan = plan_decoder(cfg)
        >>> plan.layers, plan.final_norm, plan.lm_head
        ('model.language_model.layers', 'model.language_model.norm', 'lm_head')
    """
    arch = image_text_to_text_class(hf_config)
    name = f"{arch} (model_type {getattr(hf_config, 'model_type', None)!r})"
    if arch is None:
        raise refusal(str(getattr(hf_config, "architectures", None)),
                      "it is not one of transformers' image-text-to-text models",
                      "load it with its own adapter")
    try:
        model = meta_model(hf_config)
    except Exception as err:
        raise refusal(name, f"transformers could not build it from its config "
                            f"({type(err).__name__}: {err})",
                      "build and map it") from err
    paths = {id(m): n for n, m in model.named_modules()}
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if id(embed) not in paths or head is None or id(head) not in paths:
        raise refusal(name, "it has no input embedding or no output head to map",
                      "map its embedding and unembedding")
    embed_path, lm_head = paths[id(embed)], paths[id(head)]
    decoder_path, _, embed_name = embed_path.rpartition(".")
    decoder = model.get_submodule(decoder_path)
    text_config = hf_config.get_text_config()
    n_layers = int(getattr(text_config, "num_hidden_layers", 0) or 0)
    lists = [(n, c) for n, c in decoder.named_children() if isinstance(c, torch.nn.ModuleList)]
    if len(lists) != 1 or len(lists[0][1]) != n_layers:
        raise refusal(name, f"its decoder {decoder_path or '(top)'} does not hold exactly one "
                            f"list of {n_layers} layers (children: "
                            f"{[n for n, _ in decoder.named_children()]})",
                      "map its decoder")
    layers_name, layers = lists[0]
    kinds: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        kinds.setdefault(type(layer).__name__, []).append(i)
    if len(kinds) > 1:
        listed = ", ".join(f"{k} (layers {v})" for k, v in kinds.items())
        raise refusal(name, f"its decoder layers are of {len(kinds)} kinds: {listed}; the generic "
                            f"adapter maps one kind of self-attention layer",
                      "map each kind of layer (cross-attention layers included)")
    layer = layers[0]
    layer_class = type(layer).__name__
    kids = _children_with_parameters(layer)
    if set(kids) not in (LLAMA_LAYER, GEMMA_LAYER) or \
            not all(_is_rms_norm(kids[k]) for k in kids if k.endswith("layernorm")):
        raise refusal(name, f"its decoder layer {layer_class} holds {sorted(kids)} "
                            f"({', '.join(type(kids[k]).__name__ for k in sorted(kids))}); the "
                            f"generic adapter maps Llama-style layers {sorted(LLAMA_LAYER)} and "
                            f"Gemma-style ones (plus pre_/post_feedforward_layernorm), with RMSNorms",
                      "map this layer")
    norms = [n for n, c in decoder.named_children() if _is_rms_norm(c)]
    if len(norms) != 1:
        raise refusal(name, f"its decoder {decoder_path} does not hold exactly one final RMSNorm "
                            f"(children: {[n for n, _ in decoder.named_children()]})",
                      "map its final norm")
    norm_name = norms[0]
    others = sorted(set(_children_with_parameters(decoder)) - {embed_name, layers_name, norm_name})
    if others:
        raise refusal(name, f"its decoder {decoder_path} holds modules the generic adapter "
                            f"does not map: {others}",
                      "map them")
    attn, mlp = kids["self_attn"], kids["mlp"]
    attn_kids = _children_with_parameters(attn)
    if set(attn_kids) - {"q_norm", "k_norm"} != set(QKVO) or \
            not all(isinstance(attn_kids[k], torch.nn.Linear) for k in QKVO):
        raise refusal(name, f"its attention {type(attn).__name__} holds {sorted(attn_kids)}, not "
                            f"separate q/k/v/o projections {list(QKVO)}",
                      "map its attention")
    if "ALL_ATTENTION_FUNCTIONS" not in _source(type(attn).forward):
        raise refusal(name, f"its attention {type(attn).__name__} does not call transformers' "
                            f"attention interface (ALL_ATTENTION_FUNCTIONS), so tl_vlm's hooked "
                            f"attention cannot run it",
                      "run its attention with hooks")
    mlp_kids = _children_with_parameters(mlp)
    if set(mlp_kids) != GATED_MLP or not all(isinstance(m, torch.nn.Linear) for m in mlp_kids.values()):
        raise refusal(name, f"its MLP {type(mlp).__name__} holds {sorted(mlp_kids)}, not a gated "
                            f"MLP {sorted(GATED_MLP)} (mixture-of-experts and fused MLPs are not "
                            f"mapped)",
                      "map its MLP")
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        raise refusal(name, "its text config soft-caps the final logits, and the generic path "
                            "cannot tell whether the checkpoint's forward applies it to lm_head's "
                            "output (the logit lens needs to know)",
                      "say what its forward does to the logits (Family.final_logits)")
    norm_source = _source(type(layer.input_layernorm).forward)
    rotary = decoder_path + ".rotary_emb" if "rotary_emb" in dict(decoder.named_children()) else None
    return DecoderPlan(
        architecture=arch, model_type=str(hf_config.model_type), embed=embed_path,
        layers=f"{decoder_path}.{layers_name}", n_layers=n_layers,
        final_norm=f"{decoder_path}.{norm_name}", lm_head=lm_head, rotary=rotary,
        sandwich=set(kids) == GEMMA_LAYER, qk_norm={"q_norm", "k_norm"} <= set(attn_kids),
        norm_offset="1.0 + self.weight" in norm_source or "1 + self.weight" in norm_source,
        layer_class=layer_class)


class GenericAdapter(ArchitectureAdapter):
    """A TransformerLens adapter built from a :class:`DecoderPlan` (the subclass that
    :func:`adapter_for` makes carries the plan): embedding, rotary embedding, blocks
    (``ln1``/``ln2``, or ``ln1``/``ln1_post``/``ln2``/``ln2_post`` for Gemma-style layers;
    hooked attention with ``q``/``k``/``v``/``o`` and the q/k norms; gated MLP), final
    norm and unembedding. The vision tower is not mapped (no hooks there).

    Example:
        >>> GenericAdapter.plan is None
        True
    """

    plan: Optional[DecoderPlan] = None

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        plan = self.plan
        if plan is None:
            raise TypeError("GenericAdapter is built through adapter_for(plan)")
        self.cfg.is_multimodal = True
        self._set_rms_rotary_defaults()
        if plan.norm_offset:
            self.cfg.rmsnorm_uses_offset = True
        self.weight_processing_conversions = {**self._qkvo_weight_conversions()}

        def rms(name: str) -> RMSNormalizationBridge:
            return RMSNormalizationBridge(name=name, config=self.cfg)

        norms = ({"ln1": rms("input_layernorm"), "ln1_post": rms("post_attention_layernorm"),
                  "ln2": rms("pre_feedforward_layernorm"),
                  "ln2_post": rms("post_feedforward_layernorm")} if plan.sandwich else
                 {"ln1": rms("input_layernorm"), "ln2": rms("post_attention_layernorm")})
        mapping: dict[str, Any] = {"embed": EmbeddingBridge(name=plan.embed)}
        if plan.rotary:
            mapping["rotary_emb"] = RotaryEmbeddingBridge(name=plan.rotary)
        mapping["blocks"] = BlockBridge(name=plan.layers, submodules={
            **norms, "attn": self._qkvo_attention_bridge(), "mlp": self._gated_mlp()})
        mapping["ln_final"] = rms(plan.final_norm)
        mapping["unembed"] = UnembeddingBridge(name=plan.lm_head, config=self.cfg)
        self.component_mapping = mapping
        use_hooked_attention(self)
        if plan.qk_norm:   # use_hooked_attention keeps q/k/v/o: add the q/k norm hook points
            self.component_mapping["blocks"].submodules["attn"].submodules.update(
                q_norm=rms("q_norm"), k_norm=rms("k_norm"))

    def prepare_model(self, hf_model: Any) -> None:
        """Check the loaded model against the plan read on the meta device."""
        super().prepare_model(hf_model)
        plan = self.plan
        try:
            layers = hf_model.get_submodule(plan.layers)
            for path in (plan.embed, plan.final_norm, plan.lm_head):
                hf_model.get_submodule(path)
        except AttributeError as err:
            raise refusal(plan.architecture, f"the loaded model differs from the one its config "
                                             f"builds ({err})", "map the loaded model") from err
        if len(layers) != plan.n_layers:
            raise refusal(plan.architecture, f"the loaded model has {len(layers)} decoder layers, "
                                             f"its config {plan.n_layers}", "map the loaded model")


def adapter_for(plan: DecoderPlan) -> type:
    """A :class:`GenericAdapter` subclass carrying ``plan`` (TransformerLens builds adapters
    from the config alone).

    Example:
        >>> plan = DecoderPlan("XForConditionalGeneration", "x", "e", "l", 2, "n", "h", None,
        ...                    False, False, False, "XLayer")
        >>> adapter_for(plan).plan is plan
        True
    """
    return type(f"GenericAdapter_{plan.model_type}", (GenericAdapter,),
                {"plan": plan, "__module__": __name__})


# -- the image tokens -------------------------------------------------------------------
@dataclass(frozen=True)
class ImageTokenPlan:
    """What the probe read from the processor: placeholder, content/BOI/EOI/inner ids,
    the grid rule and where each came from.

    Example:
        >>> ImageTokenPlan("<image>", 4, "config image_token_id", None, None, "", (), None, 0,
        ...                False, ("image",)).describe(lambda i: f"t{i}")
        "content = image_token_id 4 't4' (config image_token_id); BOI/EOI = none (nothing the processor marks or inserts around the runs); grid = 1-D (the processor reports none); placeholder '<image>'"
    """

    placeholder: str
    content_id: int
    content_source: str
    boi_id: Optional[int]
    eoi_id: Optional[int]
    ends_source: str
    inner_ids: tuple[int, ...]
    grid: Optional[str]            # "image_grid_thw", "image_sizes" or None (1-D)
    grid_step: int                 # merge size (image_grid_thw) or pixels per token (image_sizes)
    nested_images: bool
    counted: tuple[str, ...]

    def describe(self, name: Any) -> str:
        ends = ("none (nothing the processor marks or inserts around the runs)"
                if self.boi_id is None and self.eoi_id is None else
                f"{name(self.boi_id) if self.boi_id is not None else 'none'!r}/"
                f"{name(self.eoi_id) if self.eoi_id is not None else 'none'!r} ({self.ends_source})")
        grid = {"image_grid_thw": f"rows from image_grid_thw / merge size {self.grid_step}",
                "image_sizes": f"rows from image_sizes / {self.grid_step} px per token",
                None: "1-D (the processor reports none)"}[self.grid]
        inner = (f"; inside the runs {[name(i) for i in self.inner_ids]} (specials)"
                 if self.inner_ids else "")
        return (f"content = image_token_id {self.content_id} {name(self.content_id)!r} "
                f"({self.content_source}); BOI/EOI = {ends}{inner}; grid = {grid}; "
                f"placeholder {self.placeholder!r}")


def _int_values(*sizes: Any) -> list[int]:
    out = []
    for size in sizes:
        items = size.items() if isinstance(size, Mapping) else vars(size).items() if hasattr(size, "__dict__") else []
        out += [int(v) for _, v in items if isinstance(v, int) and not isinstance(v, bool)]
    return out


def probe_images(processor: Any) -> list[Any]:
    """Two pictures of different shapes, sized from the image processor's settings."""
    import numpy as np
    from PIL import Image

    image_processor = getattr(processor, "image_processor", None)
    sizes = _int_values(getattr(image_processor, "size", None) or {},
                        getattr(image_processor, "crop_size", None) or {})
    side = min(max(max(sizes, default=224), 28), 896)
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))
            for h, w in ((side, side), (side, side * 3 // 2))]


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def _config_image_token(config: Any) -> tuple[Optional[int], str]:
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, f"config {attr}"
    return None, ""


def infer_image_tokens(processor: Any, config: Any, model: str) -> ImageTokenPlan:
    """Run the processor on the probe and read the image-token layout from its output,
    or refuse (:class:`GenericPathError`). ``model`` names the checkpoint in messages.

    Example: see ``tests/test_generic.py`` (it needs a processor).
    """
    tok = getattr(processor, "tokenizer", processor)
    config_id, source = _config_image_token(config)
    proc_id = getattr(processor, "image_token_id", None)
    proc_token = getattr(processor, "image_token", None)
    if proc_id is None and isinstance(proc_token, str):
        proc_id = tok.convert_tokens_to_ids(proc_token)
        proc_id = None if proc_id == getattr(tok, "unk_token_id", None) else proc_id
    if config_id is None and proc_id is None:
        raise refusal(model, "no image-token marks: neither the config (image_token_id, "
                             "image_token_index) nor the processor (image_token, image_token_id) "
                             "names the token that stands for image features",
                      "name its image tokens (ImageLayout.content_token)")
    if config_id is not None and proc_id is not None and int(config_id) != int(proc_id):
        raise refusal(model, f"the image-token marks disagree: {source} = {config_id}, the "
                             f"processor's image_token_id = {proc_id}",
                      "say which token the model fills with image features")
    content = int(config_id if config_id is not None else proc_id)
    source = source or "processor image_token_id"
    placeholders = [p for p in dict.fromkeys(getattr(processor, a, None) for a in PLACEHOLDER_ATTRIBUTES)
                    if isinstance(p, str) and p]
    if not placeholders:
        raise refusal(model, "no image-token marks: the processor has no image_token string "
                             "for a prompt to write", "name the prompt's image placeholder")
    marks = {int(i) for i in (getattr(processor, "image_token_ids", None) or []) if i is not None}
    images = probe_images(processor)
    words = " ".join([PROBE_WORD] * 3)
    prompt_ids = set(tok(words)["input_ids"])
    tried = []
    for placeholder in placeholders:
        text = f"{PROBE_WORD} {placeholder} {PROBE_WORD} {placeholder} {PROBE_WORD}"
        for nested in (False, True):
            try:
                out = processor(text=[text], images=[images] if nested else images,
                                return_tensors="pt", return_mm_token_type_ids=True)
            except Exception as err:  # this form is not the processor's: try the next one
                tried.append(f"{placeholder!r}{' (nested)' if nested else ''}: "
                             f"{type(err).__name__}: {str(err)[:200]}")
                continue
            ids = out["input_ids"][0].tolist()
            if content not in ids:
                tried.append(f"{placeholder!r}: no token {content} in the expansion")
                continue
            marked = set(marks) | {content}
            if "mm_token_type_ids" in out:
                mm = out["mm_token_type_ids"][0].tolist()
                marked |= {t for t, m in zip(ids, mm) if m == 1}
            return _read_probe(model, tok, out, ids, content, source, marked, prompt_ids,
                               placeholder, nested, config, processor, len(images))
    raise refusal(model, "the processor did not expand a probe prompt with its image "
                         f"placeholder into image tokens ({'; '.join(tried)})",
                  "say how a prompt holds an image (ImageLayout.placeholder, processor_images)")


def _read_probe(model: str, tok: Any, out: Mapping[str, Any], ids: list[int], content: int,
                source: str, marked: set[int], prompt_ids: set[int], placeholder: str,
                nested: bool, config: Any, processor: Any, n_images: int) -> ImageTokenPlan:
    """BOI/EOI, inner tokens and grid from one probe expansion (see :func:`infer_image_tokens`)."""
    name = tok.convert_ids_to_tokens
    spans = [(s, e) for s, e in runs(ids, marked) if content in ids[s:e]]
    if len(spans) != n_images:
        raise refusal(model, f"the processor wrote {len(spans)} runs of image tokens for "
                             f"{n_images} images (each image should be one run: tiles, views "
                             f"or crops in separate runs are not inferred)",
                      "locate each image's runs (ImageLayout.locate_row)")
    specials = _special_ids(tok)
    boi, eoi, ends, inner, counts = set(), set(), set(), set(), []
    for s, e in spans:
        first = s + ids[s:e].index(content)
        last = e - 1 - ids[s:e][::-1].index(content)
        lead, trail = ids[s:first], ids[last + 1:e]
        if len(lead) > 1 or len(trail) > 1:
            raise refusal(model, f"BOI/EOI are ambiguous: an image's run opens with "
                                 f"{name(lead)} and closes with {name(trail)} (one token each "
                                 f"side is inferred)", "name its BOI/EOI tokens")
        inner |= {t for t in ids[first:last + 1] if t != content}
        counts.append(sum(t == content for t in ids[first:last + 1]))
        for side, mine, outside in ((boi, lead, s - 1), (eoi, trail, e)):
            if mine:
                side.add(mine[0])
                ends.add("the processor marks them")
            elif 0 <= outside < len(ids) and ids[outside] in specials \
                    and ids[outside] not in prompt_ids:
                side.add(ids[outside])
                ends.add("special tokens the processor puts around every run")
            else:
                side.add(None)
    for which, found in (("BOI", boi), ("EOI", eoi)):
        if len(found) > 1:
            shown = [name(t) if t is not None else "nothing" for t in found]
            raise refusal(model, f"{which} is ambiguous: the tokens next to the image runs "
                                 f"differ between images ({shown})",
                          f"name its {which} token(s) (ImageLayout.boi_token/eoi_token or locate_row)")
    boi_id, eoi_id = boi.pop(), eoi.pop()
    if {boi_id, eoi_id} & inner:
        raise refusal(model, "BOI/EOI are ambiguous: the token around the runs also occurs "
                             "inside them", "name its BOI/EOI tokens")
    grid, step = _grid_rule(model, out, counts, config, processor)
    counted = tuple(n for n, ok in (("boi", boi_id in marked), ("image", True),
                                    ("specials", bool(inner & marked)), ("eoi", eoi_id in marked))
                    if ok)
    return ImageTokenPlan(placeholder, content, source, boi_id, eoi_id, " and ".join(sorted(ends)),
                          tuple(sorted(inner)), grid, step, nested, counted)


def _first_int(*values: Any) -> Optional[int]:
    return next((int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)), None)


def _grid_rule(model: str, out: Mapping[str, Any], counts: list[int], config: Any,
               processor: Any) -> tuple[Optional[str], int]:
    """The processor's grid report and the step that turns it into token rows, checked
    against the probe's run lengths; (None, 0) when it reports none."""
    vision = getattr(config, "vision_config", None)
    image_processor = getattr(processor, "image_processor", None)
    if "image_grid_thw" in out:
        key, step = "image_grid_thw", _first_int(
            getattr(image_processor, "merge_size", None), getattr(processor, "merge_size", None),
            getattr(vision, "spatial_merge_size", None), getattr(config, "spatial_merge_size", None))
    elif "image_sizes" in out:
        patch = _first_int(getattr(processor, "patch_size", None))   # the processor's own
        merge = _first_int(getattr(processor, "spatial_merge_size", None),
                           getattr(config, "spatial_merge_size", None)) or 1
        key, step = "image_sizes", (patch * merge if patch else None)
    else:
        return None, 0
    if not step:
        raise refusal(model, f"the processor reports {key} but no merge or patch size turns it "
                             f"into token rows", "give its grid (ImageLayout.image_grids)")
    grids = grid_rows(key, step, out[key])
    if [r * c for r, c in grids] != counts:
        raise refusal(model, f"the grid the processor reports disagrees with the run lengths: "
                             f"{key} gives {[f'{r}x{c}' for r, c in grids]} with step {step}, but "
                             f"the images' runs hold {counts} image tokens",
                      "give its grid (ImageLayout.image_grids)")
    return key, step


def grid_rows(key: str, step: int, report: Any) -> list[tuple[int, int]]:
    """(rows, cols) of content tokens per image from ``image_grid_thw`` (t, h, w patches,
    ``step`` = merge size) or ``image_sizes`` (h, w pixels, ``step`` = pixels per token).

    Example:
        >>> grid_rows("image_grid_thw", 2, [[1, 4, 6]]), grid_rows("image_sizes", 8, [[32, 24]])
        ([(2, 3)], [(4, 3)])
    """
    rows = report.tolist() if hasattr(report, "tolist") else list(report)
    if key == "image_grid_thw":
        return [(int(t) * (int(h) // step), int(w) // step) for t, h, w in rows]
    return [(int(h) // step, int(w) // step) for h, w in rows]


class GenericLayout(ImageLayout):
    """An image layout inferred from the processor at load (:func:`infer_image_tokens`).

    An image is a maximal run of content tokens and the inner tokens found by the probe,
    with BOI right before and EOI right after it when inferred; the content is laid out
    over the reported grid, row-major, or in one row. :attr:`notice` is the one line
    logged when the layout is built.

    Example:
        >>> GenericLayout.plan is None
        True
    """

    plan: Optional[DecoderPlan] = None
    native = False
    gate_description = "inferred at load (generic path)"

    def __init__(self, processor: Any, config: Any) -> None:
        super().__init__(processor, config)
        model = self.plan.architecture if self.plan else type(config).__name__
        tokens = infer_image_tokens(processor, config, model)
        name = self.tokenizer.convert_ids_to_tokens
        self.tokens = tokens
        self.placeholder = tokens.placeholder
        self.content_token = name(tokens.content_id)
        self.boi_token = name(tokens.boi_id) if tokens.boi_id is not None else None
        self.eoi_token = name(tokens.eoi_id) if tokens.eoi_id is not None else None
        self.processor_counted = tokens.counted
        self.gate_description = (f"EOI {self.eoi_token} (generic path: a candidate, not verified)"
                                 if self.eoi_token else "none (no end-of-image token; generic path)")
        decoder = self.plan.describe() + "; " if self.plan else ""
        self.notice = (f"tl_vlm: no family file for {model}; loading it on the generic path, "
                       f"which inferred: {decoder}{tokens.describe(name)}. Check these, or pin "
                       f"them in a family file ({ADD_A_FAMILY}).")
        logger.warning(self.notice)

    def processor_images(self, per_prompt: list[list[Any]]) -> Any:
        if self.tokens.nested_images:
            return [list(imgs) for imgs in per_prompt]
        return super().processor_images(per_prompt)

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[tuple[int, int]]]:
        if self.tokens.grid is None:
            return None
        if self.tokens.grid not in inputs:
            if any(inputs.get(k) is not None for k in self.image_input_names):
                raise LayoutError(f"the processor output holds images but no "
                                  f"{self.tokens.grid}, from which the generic path reads rows")
            return []
        return grid_rows(self.tokens.grid, self.tokens.grid_step, inputs[self.tokens.grid])

    def locate_row(self, ids: list[int], grids: GridQueue) -> RowLayout:
        """Runs of content (and inner) tokens, BOI/EOI checked around each, the content
        laid out over the reported grid or in one row."""
        content, inner = self.tokens.content_id, set(self.tokens.inner_ids)
        out = RowLayout()
        for n_img, (start, end) in enumerate(runs(ids, {content} | inner)):
            if self.boi_token is not None:
                self.expect_token(ids, start - 1, "boi", n_img)
                out.boi.append(start - 1)
            if self.eoi_token is not None:
                self.expect_token(ids, end, "eoi", n_img)
                out.eoi.append(end)
                out.gate.append(end)
            image = [p for p in range(start, end) if ids[p] == content]
            out.specials += [p for p in range(start, end) if ids[p] != content]
            grid = grids.pop()
            cols = len(image)
            if grid is not None:
                rows, cols = grid
                if rows * cols != len(image):
                    raise LayoutError(
                        f"image {n_img}: the processor reports a {rows}x{cols} grid "
                        f"({rows * cols} tokens) but the ids hold {len(image)} image tokens")
            out.image += image
            out.grid += [(n_img, k // max(cols, 1), k % max(cols, 1)) for k in range(len(image))]
        return out


def generic_family(hf_config: Any) -> Optional[Family]:
    """The generic path's family for a checkpoint no family file claims: None when the
    checkpoint is not a transformers image-text-to-text model (the path does not apply),
    a :class:`GenericPathError` when its decoder cannot be mapped. Its layout refuses,
    when built, what the processor does not mark for certain.

    Example:
        >>> from transformers import BertConfig
        >>> generic_family(BertConfig(architectures=["BertModel"])) is None
        True
    """
    if image_text_to_text_class(hf_config) is None:
        return None
    plan = plan_decoder(hf_config)
    layout = type(f"GenericLayout_{plan.model_type}", (GenericLayout,),
                  {"plan": plan, "__module__": __name__})
    return Family(
        name=f"generic:{plan.model_type}",
        title=f"{plan.architecture} (generic path)",
        architectures=(plan.architecture,),
        adapter=adapter_for(plan),
        layout=layout,
        image_tokens="inferred from the processor at load (generic path)",
    )
