"""The paper's prompts (tl_vlm.eval.prompts): the authors' strings, and prompts every family's
processor accepts (``HookedVLM.prepare`` on the tiny models of tests/tiny)."""

from __future__ import annotations

import pytest

from tl_vlm.eval.data import open_eval_set
from tl_vlm.eval.prompts import (LONG_VQA_INSTRUCTION, PAPER_TEMPLATES, VQA_MODES, PromptBuilder,
                            PromptError, emu3_turn_tokens)

# Eval spec 1.2 (the authors' Tab1 scripts), with {img} the family's placeholder.
Q = "What is on the table?"
PAPER_VQA = {
    "chameleon": "<image>" + Q + "\nAnswer the question using a single word or phrase. Answer:",
    "llava_onevision": "<|im_start|><image><|im_end|>" + Q
                       + "\nAnswer the question using a single word or phrase. Answer:",
    "pixtral": "[INST]<s>[IMG]" + Q + '"\nAnswer the question using a single word or phrase."'
               "[/INST]",
    "janus": '"<image_placeholder>USER:' + Q + '"\nAnswer the question using a single word or '
             'phrase."\nASSISTANT:"',
}
PAPER_CAPTION = {
    "chameleon": "<image>Provide a one-sentence caption for the provided image.",
    "llava_onevision": "<|im_start|><image><|im_end|>USER: Provide a one-sentence caption for "
                       "the provided image. ASSISTANT:",
    "pixtral": '[INST]"<s>[IMG] Provide a one-sentence caption for the provided image."[/INST]',
    "janus": "<image_placeholder>USER:Provide a one-sentence caption for the provided image. "
             "ASSISTANT:",
}
PLACEHOLDER = {"chameleon": "<image>", "llava_onevision": "<image>", "pixtral": "[IMG]",
               "janus": "<image_placeholder>", "emu3": "<image>"}


def chat_template(image_marker: str, bos: str = "") -> str:
    """A small chat template in the usual form: ROLE: images, then texts, per turn."""
    return (bos + "{% for m in messages %}{{ m['role'] | upper }}: "
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image_marker
            + "{% endif %}{% endfor %}"
            "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
            "{% endif %}{% endfor %} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@pytest.mark.parametrize("name", sorted(PAPER_VQA))
def test_paper_strings_are_the_authors(name):
    builder = PromptBuilder(name, PLACEHOLDER[name])
    assert builder.vqa(Q).text == PAPER_VQA[name]
    assert builder.caption().text == PAPER_CAPTION[name]


@pytest.mark.parametrize("name", sorted(PAPER_VQA))
def test_clean_style_only_drops_the_stray_quotes(name):
    paper = PromptBuilder(name, PLACEHOLDER[name])
    clean = PromptBuilder(name, PLACEHOLDER[name], style="clean")
    for mode in VQA_MODES:
        p, c = (PromptBuilder(name, PLACEHOLDER[name], style=s, vqa_mode=mode).vqa(Q).text
                for s in ("paper", "clean"))
        assert c == p.replace('"', "")
    assert clean.caption().text == paper.caption().text.replace('"', "")
    assert '"' not in clean.vqa(Q).text + clean.caption().text


def test_long_instruction_mode():
    text = PromptBuilder("pixtral", "[IMG]", vqa_mode="prompt").vqa(Q).text
    assert text == "[INST]<s>[IMG]" + Q + LONG_VQA_INSTRUCTION + "[/INST]"
    assert LONG_VQA_INSTRUCTION.count("- ") == 4 and "\n" not in LONG_VQA_INSTRUCTION
    janus = PromptBuilder("janus", "<image_placeholder>", vqa_mode="prompt").vqa(Q).text
    assert "single word or phrase- Answer the question" in janus
    assert janus.endswith('You must answer.."\nASSISTANT:"')   # the authors' double period


def test_emu3_paper_prompts_follow_the_authors_preprocessing(tiny_zoo, monkeypatch):
    model = tiny_zoo.model("emu3")
    tok = model.layout.tokenizer
    bos, eos = tok.bos_token, tok.eos_token
    caption = PromptBuilder.for_model(model).caption()
    assert caption.text == f"{bos}USER:<image>\nDescribe this picture briefly{eos}{bos}ASSISTANT:"
    with pytest.raises(PromptError, match="chat template"):
        PromptBuilder.for_model(model).vqa(Q)       # the authors rendered VQA through it
    monkeypatch.setattr(model.processor, "chat_template", chat_template("<image>"))
    assert PromptBuilder.for_model(model).vqa(Q).text == (
        f"{bos}USER: <image>\n{Q}{eos}{bos}ASSISTANT:")
    assert PromptBuilder.for_model(model, vqa_mode="prompt").vqa(Q).text == (
        f"{bos}USER: <image>\n{Q}Answer the question using a single word or phrase."
        f"{eos}{bos}ASSISTANT:")
    assert emu3_turn_tokens("USER: a  b ASSISTANT:", "<B>", "<E>") == "<B>USER: a  b<E><B>ASSISTANT:"


@pytest.mark.parametrize("style", ["paper", "clean"])
def test_every_family_prepares_every_prompt(tiny_zoo, family, style, monkeypatch):
    model = tiny_zoo.model(family)
    if family == "emu3":
        monkeypatch.setattr(model.processor, "chat_template", chat_template("<image>"))
    image = tiny_zoo.specs[family].images[0]
    for mode in VQA_MODES:
        builder = PromptBuilder.for_model(model, style, mode)
        prompts = [builder.vqa("what is this")]
        if mode == "zero-shot":
            prompts += [builder.caption(), builder.imagenet("this is a")]
        for prompt in prompts:
            assert model.layout.count_placeholders(prompt.text) == 1, prompt.text
            batch = model.prepare([prompt.text], images=[image], **prompt.processor_kwargs)
            assert batch.positions.n_images(0) == 1
            assert batch.positions.image.counts.item() > 0
    assert builder.record()["templates"] == (family if family in PAPER_TEMPLATES else "generic")


def test_chameleon_completion_flag_reaches_the_processor(tiny_zoo):
    model = tiny_zoo.model("chameleon")
    sep = model.layout.tokenizer.sep_token_id
    image = tiny_zoo.specs["chameleon"].images[0]
    last = {}
    for mode in VQA_MODES:
        prompt = PromptBuilder.for_model(model, vqa_mode=mode).vqa("what is this")
        batch = model.prepare([prompt.text], images=[image], **prompt.processor_kwargs)
        last[mode] = batch.input_ids[0, -1].item()
    assert last["prompt"] == sep != last["zero-shot"]   # the authors' completion=False/True


@pytest.mark.parametrize("name", ["chameleon", "pixtral", "qwen2_vl", "llava"])
def test_chat_style_uses_the_checkpoints_template(tiny_zoo, name, monkeypatch):
    model = tiny_zoo.model(name)
    tok, marker = model.layout.tokenizer, model.layout.placeholder
    monkeypatch.setattr(model.processor, "chat_template", chat_template(marker, tok.bos_token))
    builder = PromptBuilder.for_model(model, style="chat")
    prompt = builder.vqa("what is this")
    assert prompt.text == (f"{tok.bos_token}USER: {marker}what is this\nAnswer the question "
                           f"using a single word or phrase. ASSISTANT:")
    assert prompt.processor_kwargs["add_special_tokens"] is False   # the template wrote BOS
    image = tiny_zoo.specs[name].images[0]
    batch = model.prepare([prompt.text], images=[image], **prompt.processor_kwargs)
    assert (batch.input_ids[0] == tok.bos_token_id).sum().item() == 1
    assert batch.positions.n_images(0) == 1
    assert builder.record()["prompt_set"] == "chat" and "chat_template_sha1" in builder.record()


def test_chat_style_without_a_template_is_refused(tiny_zoo):
    with pytest.raises(PromptError, match="has none; use style='paper' or 'clean'"):
        PromptBuilder.for_model(tiny_zoo.model("pixtral"), style="chat")


def test_chat_template_with_the_wrong_image_marker_is_caught(tiny_zoo, monkeypatch):
    model = tiny_zoo.model("pixtral")
    monkeypatch.setattr(model.processor, "chat_template", chat_template("<image>"))
    with pytest.raises(PromptError, match="holds 0 image markers"):
        PromptBuilder.for_model(model, style="chat").caption()


def test_vqa_set_end_to_end_on_a_tiny_model(tiny_zoo, tiny_data):
    model = tiny_zoo.model("chameleon")
    examples = open_eval_set("vqav2", override=str(tiny_data.path("vqav2")), n=3).examples()
    builder = PromptBuilder.for_model(model)
    asked, kwargs = builder.apply("vqa", examples)
    assert kwargs == {"return_for_text_completion": True}
    assert [ex.prompt for ex in asked] == [builder.vqa(ex.prompt).text for ex in examples]
    assert [ex.references for ex in asked] == [ex.references for ex in examples]
    batch = model.prepare([ex.prompt for ex in asked], images=[ex.images[0] for ex in asked],
                          padding_side="left", **kwargs)
    assert [batch.positions.n_images(b) for b in range(3)] == [1, 1, 1]
    with pytest.raises(ValueError, match="task must be one of"):
        builder.apply("gqa", examples)
