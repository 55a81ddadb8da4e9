"""The generic path (tl_vlm.core.generic): model types with no family file.

For each model type in ``tests/generic_tiny.py`` (tiny random checkpoints, saved and
loaded back offline through ``HookedVLM.from_pretrained(path)``): it loads on the
generic path with one notice saying what was inferred, its logits equal Hugging Face's
(SDPA unhooked, eager with a pattern hook) to 1e-5 in fp32 on padded batches, its image
positions equal the processor's own marks, a gate/image knockout changes the logits and a
pattern edit reaches them exactly. Then one test per refusal, with its message.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from tests import generic_tiny
from tests.reference import logits_with_pattern_edit

ATOL = 1e-5
NAMES = sorted(generic_tiny.SPECS)


class GenericZoo:
    """Each generic model type built once, loaded once; the log lines of each load kept."""

    def __init__(self, root) -> None:
        self.root = root
        self.paths: dict = {}
        self.models: dict = {}
        self.logs: dict = {}

    def path(self, name: str):
        if name not in self.paths:
            target = self.root / name
            target.mkdir()
            torch.manual_seed(0)
            generic_tiny.SPECS[name].build(target)
            self.paths[name] = target
        return self.paths[name]

    def model(self, name: str):
        if name not in self.models:
            self.models[name], self.logs[name] = load_logged(self.path(name))
        return self.models[name]

    def batch(self, name: str, images=None, **kwargs):
        spec, model = generic_tiny.SPECS[name], self.model(name)
        prompts = [p.format(img=model.layout.placeholder) for p in spec.prompts]
        return model, model.prepare(prompts, images=images or spec.images, **kwargs)

    def reference(self, name: str, attn: str):
        """The plain HF model, its text decoder on ``attn`` ("sdpa" or "eager"); a vision
        tower without SDPA (GOT-OCR2's) stays on eager, as tl_vlm leaves it."""
        from transformers import AutoModelForImageTextToText

        kwargs = dict(dtype=torch.float32)
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                str(self.path(name)), attn_implementation=attn, **kwargs)
        except ValueError:
            model = AutoModelForImageTextToText.from_pretrained(
                str(self.path(name)), **kwargs,
                attn_implementation={"": "eager", "vision_config": "eager", "text_config": attn})
        return model.eval()


def load_logged(path, **kwargs):
    """``HookedVLM.from_pretrained(path)`` and the ``tl_vlm`` log lines it wrote."""
    from tl_vlm import HookedVLM

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("tl_vlm")
    logger.addHandler(handler)
    try:
        return HookedVLM.from_pretrained(str(path), **kwargs), lines
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> GenericZoo:
    return GenericZoo(tmp_path_factory.mktemp("generic_models"))


# -- every generic model type ------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_loads_on_the_generic_path_and_says_what_it_inferred(zoo, name):
    from transformers import AutoConfig

    from tl_vlm.adapters import family_for_config, families

    model = zoo.model(name)
    config = AutoConfig.from_pretrained(str(zoo.path(name)))
    assert not any(set(config.architectures) & set(f.architectures) for f in families())
    assert model.family.name == family_for_config(config).name == f"generic:{config.model_type}"
    notices = [line for line in zoo.logs[name] if "generic path" in line]
    assert len(notices) == 1, zoo.logs[name]       # once per load
    for part in generic_tiny.SPECS[name].notice:
        assert part in notices[0], (part, notices[0])
    assert notices[0] == model.layout.notice
    assert type(model.blocks[0].attn).__name__ == "HookedAttentionBridge"


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_images_change_the_logits(zoo, name):
    """Guards the tests below: a model that ignores its images proves nothing."""
    model, batch = zoo.batch(name)
    _, other = zoo.batch(name, images=generic_tiny.SPECS[name].other_images)
    assert torch.equal(batch.input_ids, other.input_ids)
    diff = (model(batch) - model(other)).abs().amax(dim=(1, 2))
    assert (diff > 1e-3).all(), f"image does not reach the logits: {diff}"


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_logits_equal_hf_sdpa_unhooked_and_eager_hooked(zoo, name):
    sdpa, eager = zoo.reference(name, "sdpa"), zoo.reference(name, "eager")
    for side in ("right", "left"):
        model, batch = zoo.batch(name, padding_side=side)
        assert batch.padding_side in ("left", "right")        # the batch is padded
        mask = batch.attention_mask.bool()
        torch.testing.assert_close(model(batch)[mask], sdpa(**batch.inputs).logits[mask],
                                   atol=ATOL, rtol=0)
        # a hook on the pattern puts every layer on the eager path
        seen = []
        hooks = [(f"blocks.{i}.attn.hook_pattern", lambda p, hook: seen.append(hook.name))
                 for i in range(model.cfg.n_layers)]
        hooked = model.run_with_hooks(batch, fwd_hooks=hooks)
        assert len(seen) == model.cfg.n_layers
        torch.testing.assert_close(hooked[mask], eager(**batch.inputs).logits[mask],
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_positions_equal_the_processors_marks(zoo, name):
    model, batch = zoo.batch(name)
    pos, layout = batch.positions, model.layout
    spec = generic_tiny.SPECS[name]
    per_prompt = [imgs if isinstance(imgs, list) else [imgs] for imgs in spec.images]
    texts = [layout.with_placeholders(p.format(img=layout.placeholder), len(imgs))
             for p, imgs in zip(spec.prompts, per_prompt)]
    # the processor's own marks, asked for explicitly
    marks = model.processor(text=texts, images=layout.processor_images(per_prompt),
                            return_tensors="pt", padding=True, padding_side=batch.padding_side,
                            return_mm_token_type_ids=True)
    assert torch.equal(marks["input_ids"], batch.input_ids)
    marked = marks["mm_token_type_ids"] == 1
    placed = torch.zeros_like(marked)
    for which in layout.processor_counted:
        placed |= getattr(pos, which).mask
    assert torch.equal(placed, marked)
    content = batch.input_ids == layout.token_id(layout.content_token)
    assert torch.equal(pos.image.mask, content)
    assert [pos.n_images(b) for b in range(len(batch))] == [1, 2]
    # rows: the reported grid (row-major), or one row per image
    for b, grid in enumerate(pos.grid):
        for img in grid[:, 0].unique().tolist():
            cells = grid[grid[:, 0] == img][:, 1:]
            rows, cols = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
            assert rows * cols == len(cells)
            if layout.tokens.grid is None:
                assert rows == 1


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_gate_or_image_knockout_changes_the_logits(zoo, name):
    from tl_vlm import analyses as A

    model, batch = zoo.batch(name)
    has_eoi = bool(batch.positions.eoi.counts.sum())
    assert has_eoi == (model.layout.eoi_token is not None)
    hooks = (A.gate_knockout(model, batch) if has_eoi
             else A.image_to_text_knockout(model, batch))
    last = batch.positions.last.mask
    cut = model.run_with_hooks(batch, fwd_hooks=hooks)[last]
    assert (cut - model(batch)[last]).abs().max() > 1e-4


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_pattern_edits_are_live(zoo, name):
    """Zeroing one image key in the last layer == HF eager with that change added by hand."""
    model, batch = zoo.batch(name)
    layer = model.cfg.n_layers - 1
    key = int(batch.positions.image[1][1])

    def zero_key(pattern):
        pattern = pattern.clone()
        pattern[..., key] = 0.0
        return pattern

    got = model.run_with_hooks(batch, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern",
                                                  lambda p, hook: zero_key(p))])
    assert (got - model(batch)).abs().max() > 1e-4, "the edit did not reach the logits"
    expected = logits_with_pattern_edit(model, zoo.reference(name, "eager"), batch.inputs,
                                        {layer: zero_key})
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=ATOL, rtol=0)


def test_inserted_special_tokens_are_inferred_as_boi_eoi(zoo):
    """Specials the processor writes around every run (unmarked) are BOI/EOI."""
    processor = generic_tiny.wrapping_processor(zoo.path("vipllava"), [("<x>", "</x>")])
    model, logs = load_logged(zoo.path("vipllava"), processor=processor)
    assert (model.layout.boi_token, model.layout.eoi_token) == ("<x>", "</x>")
    assert "BOI/EOI = '<x>'/'</x>' (special tokens the processor puts around every run)" in logs[0]
    batch = model.prepare(["a cat <image> the <image> dog"], images=[[
        generic_tiny.image(1), generic_tiny.image(2)]])
    ids = batch.input_ids[0].tolist()
    assert [ids[p] for p in batch.positions.eoi[0].tolist()] == [model.layout.token_id("</x>")] * 2


def test_a_named_family_always_wins():
    from transformers import LlavaConfig

    from tl_vlm.adapters import family_for_config

    assert family_for_config(LlavaConfig(architectures=["LlavaForConditionalGeneration"])).name \
        == "llava"


# -- refusals: one test each, with its message --------------------------------------------
def _config_dir(tmp_path, config) -> str:
    """A checkpoint directory holding only ``config.json``: the decoder refusals come from
    the config alone, before the processor or any weight is read."""
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def _refused(path, match, **kwargs):
    from tl_vlm import HookedVLM
    from tl_vlm.core.generic import GenericPathError
    from tl_vlm.core.family import UnsupportedModelError

    with pytest.raises(GenericPathError, match=match) as err:
        HookedVLM.from_pretrained(str(path), **kwargs)
    assert isinstance(err.value, UnsupportedModelError)
    assert 'CONTRIBUTING.md, "Adding a family"' in str(err.value)
    assert "Write a family file, tl_vlm/adapters/<name>.py" in str(err.value)
    return str(err.value)


def test_refuses_cross_attention_layers(tmp_path):
    """Mllama: self- and cross-attention layers in one decoder."""
    from transformers import MllamaConfig

    cfg = MllamaConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_global_layers=1, num_attention_heads=4, image_size=16, patch_size=4,
                           vision_output_dim=32, intermediate_layers_indices=[0]),
        architectures=["MllamaForConditionalGeneration"])
    message = _refused(_config_dir(tmp_path, cfg), "decoder layers are of 2 kinds")
    assert ("MllamaSelfAttentionDecoderLayer (layers [0]), MllamaCrossAttentionDecoderLayer "
            "(layers [1])") in message
    assert "map each kind of layer (cross-attention layers included)" in message


def test_refuses_an_unknown_layer_structure(tmp_path):
    """Cohere2-Vision: one LayerNorm per layer, attention and MLP in parallel."""
    from transformers import Cohere2VisionConfig

    cfg = Cohere2VisionConfig(
        text_config=dict(model_type="cohere2", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4),
        architectures=["Cohere2VisionForConditionalGeneration"])
    message = _refused(_config_dir(tmp_path, cfg),
                       r"its decoder layer Cohere2DecoderLayer holds \['input_layernorm', 'mlp', "
                       r"'self_attn'\]")
    assert "Cohere2LayerNorm" in message and "map this layer" in message


def test_refuses_a_mixture_of_experts_mlp(tmp_path):
    """Aria: the text decoder's MLP is a mixture of experts."""
    from transformers import AriaConfig

    cfg = AriaConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, moe_num_experts=2,
                         moe_topk=1, moe_num_shared_experts=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=4),
        projector_patch_to_query_dict={4: 2, 16: 2}, architectures=["AriaForConditionalGeneration"])
    message = _refused(_config_dir(tmp_path, cfg), "its MLP AriaTextMoELayer holds")
    assert "not a gated MLP ['down_proj', 'gate_proj', 'up_proj']" in message


def test_refuses_soft_capped_logits(tmp_path):
    """A Gemma 2 text decoder (Gemma-style layers, mapped) with final-logit soft-capping."""
    from transformers import CLIPVisionConfig, Gemma2Config, VipLlavaConfig

    cfg = VipLlavaConfig(
        text_config=Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=8, final_logit_softcapping=30.0),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=16, patch_size=4),
        vision_feature_layers=[-1, -2], architectures=["VipLlavaForConditionalGeneration"])
    _refused(_config_dir(tmp_path, cfg), "soft-caps the final logits")
    from tl_vlm.core.generic import plan_decoder

    cfg.text_config.final_logit_softcapping = None
    plan = plan_decoder(cfg)                 # without it, Gemma-style layers are mapped
    assert plan.sandwich and plan.norm_offset and plan.qk_norm is False


def test_refuses_an_attention_outside_the_interface(tmp_path, monkeypatch):
    """An attention whose forward does not call transformers' attention interface."""
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaAttention.forward

    def own_attention(self, *args, **kwargs):   # stands for a hand-written attention
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", own_attention)
    from transformers import AutoConfig

    src = tmp_path / "src"
    src.mkdir()
    generic_tiny.vipllava(src)
    _refused(_config_dir(tmp_path / "cfg", AutoConfig.from_pretrained(src)),
             r"its attention LlamaAttention does not call transformers' attention interface")


def test_refuses_a_decoder_with_modules_it_does_not_map(monkeypatch):
    """A decoder holding a parameterised module besides embedding, layers and norm."""
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig
    from transformers.models.llama import modeling_llama

    from tl_vlm.core.generic import GenericPathError, plan_decoder

    init = modeling_llama.LlamaModel.__init__

    def with_extra(self, config):
        init(self, config)
        self.per_layer_gate = torch.nn.Linear(4, 4)

    monkeypatch.setattr(modeling_llama.LlamaModel, "__init__", with_extra)
    cfg = VipLlavaConfig(
        text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=16, patch_size=4),
        vision_feature_layers=[-1, -2], architectures=["VipLlavaForConditionalGeneration"])
    with pytest.raises(GenericPathError, match=r"holds modules the generic adapter does not "
                                               r"map: \['per_layer_gate'\]"):
        plan_decoder(cfg)


def test_a_non_image_text_to_text_model_keeps_the_plain_error():
    from transformers import BertConfig

    from tl_vlm.adapters import UnsupportedModelError, family_for_config
    from tl_vlm.core.generic import GenericPathError

    with pytest.raises(UnsupportedModelError, match="covers transformers' image-text-to-text "
                                                    "models only") as err:
        family_for_config(BertConfig(architectures=["BertModel"]))
    assert not isinstance(err.value, GenericPathError)


def test_refuses_without_image_token_marks(zoo):
    """No marks at all (config and processor name none), and a processor with no image
    token for prompts to write."""
    from types import SimpleNamespace

    from tl_vlm.core.generic import GenericPathError, infer_image_tokens

    tokenizer = generic_tiny.make_tokenizer(["<image>"])
    with pytest.raises(GenericPathError, match=r"no image-token marks: neither the config "
                                               r"\(image_token_id, image_token_index\) nor the "
                                               r"processor"):
        infer_image_tokens(tokenizer, SimpleNamespace(), "XForConditionalGeneration")
    _refused(zoo.path("vipllava"), "no image-token marks: the processor has no image_token string",
             processor=tokenizer)


def test_refuses_disagreeing_marks(zoo, tmp_path):
    path = tmp_path / "vipllava"
    shutil.copytree(zoo.path("vipllava"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["image_token_index"] = cfg["image_token_id"] = 5
    (path / "config.json").write_text(json.dumps(cfg))
    _refused(path, r"the image-token marks disagree: config image_token_id = 5, the "
                   r"processor's image_token_id = 4")


def test_refuses_when_the_processor_writes_no_content_token(zoo):
    processor = generic_tiny.renamed_token_processor(zoo.path("vipllava"))
    _refused(zoo.path("vipllava"), r"did not expand a probe prompt with its image placeholder "
                                   r"into image tokens \('<image>': no token 4 in the expansion",
             processor=processor)


def test_refuses_ambiguous_boi_eoi(zoo):
    """The tokens around the runs differ between images; or two tokens open a run."""
    path = zoo.path("vipllava")
    differing = generic_tiny.wrapping_processor(path, [("<x>", "</x>"), ("<y>", "</y>")])
    _refused(path, r"BOI is ambiguous: the tokens next to the image runs differ between images",
             processor=differing)
    half = generic_tiny.wrapping_processor(path, [("<x>", ""), ("", "")])
    _refused(path, r"BOI is ambiguous: .*'nothing'", processor=half)
    doubled = generic_tiny.wrapping_processor(path, [("<x><y>", "</x>")], marked=["<x>", "<y>", "</x>"])
    _refused(path, r"BOI/EOI are ambiguous: an image's run opens with \['<x>', '<y>'\]",
             processor=doubled)
    inside = generic_tiny.wrapping_processor(path, [("<x>", "</x>")], runs_per_image=1,
                                             marked=["<x>", "</x>"])
    model, _ = load_logged(path, processor=inside)    # marked BOI/EOI: inferred, not refused
    assert (model.layout.boi_token, model.layout.eoi_token) == ("<x>", "</x>")


def test_refuses_several_runs_per_image(zoo):
    processor = generic_tiny.wrapping_processor(zoo.path("vipllava"), [("", "")], runs_per_image=2)
    _refused(zoo.path("vipllava"), r"the processor wrote 4 runs of image tokens for 2 images",
             processor=processor)


def test_refuses_a_grid_that_disagrees_with_the_runs(zoo):
    processor = generic_tiny.extra_token_processor(zoo.path("paddleocr_vl"))
    message = _refused(zoo.path("paddleocr_vl"), "the grid the processor reports disagrees with "
                                                 "the run lengths: image_grid_thw gives",
                       processor=processor)
    assert "give its grid (ImageLayout.image_grids)" in message


def test_refuses_a_grid_report_without_a_step(zoo):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(zoo.path("lighton_ocr")))
    processor.patch_size = None        # image_sizes (pixels), but no pixels per token
    _refused(zoo.path("lighton_ocr"), "the processor reports image_sizes but no merge or patch "
                                      "size turns it into token rows", processor=processor)


def test_refusals_come_before_any_weight_is_read(zoo, monkeypatch):
    """The layout's refusals come from the processor, before TransformerLens boots."""
    from transformer_lens.model_bridge import TransformerBridge

    def boot(*args, **kwargs):
        raise AssertionError("weights were read before the refusal")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boot)
    processor = generic_tiny.wrapping_processor(zoo.path("vipllava"), [("<x>", "</x>"), ("<y>", "</y>")])
    _refused(zoo.path("vipllava"), "BOI is ambiguous", processor=processor)


def test_docstring_examples():
    import doctest

    import tl_vlm.core.generic as generic

    result = doctest.testmod(generic, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10 and result.failed == 0


# -- the decoder refusals that need a module tree bent by hand ---------------------------
def _vipllava_config(**text):
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig

    text = dict(dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4), **text)
    return VipLlavaConfig(
        text_config=text.pop("config", None) or LlamaConfig(**text),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=16, patch_size=4),
        vision_feature_layers=[-1, -2], architectures=["VipLlavaForConditionalGeneration"])


def test_refuses_fused_qkv_projections(tmp_path):
    """A Phi-3 text decoder: Llama-style layer names, but one fused qkv_proj."""
    from transformers import Phi3Config

    cfg = _vipllava_config(config=Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             pad_token_id=0))
    _refused(_config_dir(tmp_path, cfg), r"its attention Phi3Attention holds \['o_proj', "
                                         r"'qkv_proj'\], not separate q/k/v/o projections")


def test_refuses_what_transformers_cannot_build(tmp_path):
    """A config transformers itself cannot build a model from (a padding id outside the
    vocabulary) is refused with transformers' own reason."""
    from transformers import MllamaConfig

    cfg = MllamaConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4),
                       architectures=["MllamaForConditionalGeneration"])
    _refused(_config_dir(tmp_path, cfg), r"transformers could not build it from its config "
                                         r"\(AssertionError: Padding_idx must be within")


def test_refuses_a_model_without_an_output_head(monkeypatch):
    from transformers import VipLlavaForConditionalGeneration

    from tl_vlm.core.generic import GenericPathError, plan_decoder

    monkeypatch.setattr(VipLlavaForConditionalGeneration, "get_output_embeddings", lambda self: None)
    with pytest.raises(GenericPathError, match="it has no input embedding or no output head"):
        plan_decoder(_vipllava_config())


@pytest.mark.parametrize("bend, match", [
    ("second_list", r"does not hold exactly one list of 2 layers \(children: \['embed_tokens', "
                    r"'layers', 'norm', 'rotary_emb', 'extra_layers'\]\)"),
    ("layer_norm", r"does not hold exactly one final RMSNorm"),
])
def test_refuses_an_unexpected_decoder(monkeypatch, bend, match):
    from transformers.models.llama import modeling_llama

    from tl_vlm.core.generic import GenericPathError, plan_decoder

    init = modeling_llama.LlamaModel.__init__

    def bent(self, config):
        init(self, config)
        if bend == "second_list":
            self.extra_layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
        else:
            self.norm = torch.nn.LayerNorm(config.hidden_size)

    monkeypatch.setattr(modeling_llama.LlamaModel, "__init__", bent)
    with pytest.raises(GenericPathError, match=match):
        plan_decoder(_vipllava_config())


def test_refuses_a_loaded_model_that_differs_from_the_plan(zoo):
    """The adapter checks the loaded model against the plan read on the meta device."""
    from tl_vlm.core.generic import GenericAdapter, GenericPathError

    model = zoo.model("vipllava")
    hf = zoo.reference("vipllava", "eager")
    hf.model.language_model.layers = hf.model.language_model.layers[:1]
    with pytest.raises(GenericPathError, match="the loaded model has 1 decoder layers, its "
                                               "config 2"):
        GenericAdapter.prepare_model(model.adapter, hf)


def test_refuses_boi_eoi_that_also_occur_inside_the_runs(zoo):
    path = zoo.path("vipllava")
    processor = generic_tiny.wrapping_processor(path, [("<x>", "</x>")], runs_per_image=2,
                                                joiner="<x>", marked=["<x>", "</x>"])
    _refused(path, "BOI/EOI are ambiguous: the token around the runs also occurs inside them",
             processor=processor)


def test_a_plan_for_a_model_that_is_no_image_text_to_text_model():
    from transformers import BertConfig

    from tl_vlm.core.generic import GenericPathError, plan_decoder

    with pytest.raises(GenericPathError, match="it is not one of transformers' image-text-to-text"):
        plan_decoder(BertConfig(architectures=["BertModel"]))


def test_grid_reports_are_checked_at_every_batch(zoo):
    """After load, a batch whose grid report is missing or disagrees is a LayoutError."""
    from tl_vlm.core.layout import LayoutError

    model, batch = zoo.batch("paddleocr_vl")
    inputs = dict(batch.inputs)
    with pytest.raises(LayoutError, match="holds images but no image_grid_thw"):
        model.layout.image_grids({k: v for k, v in inputs.items() if k != "image_grid_thw"})
    inputs["image_grid_thw"] = inputs["image_grid_thw"].clone()
    inputs["image_grid_thw"][0, 1] += 2
    with pytest.raises(LayoutError, match=r"image 0: the processor reports a \d+x\d+ grid"):
        model.layout.locate(inputs["input_ids"], inputs["attention_mask"], inputs)
