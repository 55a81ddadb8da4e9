"""Prompts for the paper's tasks, per model family.

Three styles, recorded with a run (:meth:`PromptBuilder.record`):

- ``paper``: the authors' strings (``Tab1_AblationVQA.py``, ``Tab1_AblationCaptioning.py``
  and, for ImageNet, ``src/activations.py``), stray quotes included.
- ``clean``: the same strings with the stray quotes dropped.
- ``chat``: the checkpoint's own chat template (``processor.apply_chat_template``), the
  image first and the instruction in one user turn.

``{img}`` in a template is the family's image placeholder (the layout's
``placeholder``), which :meth:`~tl_vlm.core.model.HookedVLM.prepare` expands. A prompt can
need processor arguments (Chameleon's ``return_for_text_completion``): a
:class:`Prompt` carries them next to the text, to pass on to ``prepare``.

VQA has two modes, as in the authors' script: ``zero-shot`` (the default; the short
"single word or phrase" instruction) and ``prompt`` (their long instruction block).
Families without templates of the authors (LLaVA 1.5, Qwen2-VL, Qwen2.5-VL, Gemma 3)
get :data:`GENERIC`, the authors' plain completion prompt (Chameleon's) without
processor arguments; for instruction-tuned checkpoints the ``chat`` style is usually the
better choice.

Example:
    >>> from tl_vlm import HookedVLM
    >>> model = HookedVLM.from_pretrained("toy-gated")            # the chameleon family
    >>> prompt = PromptBuilder.for_model(model).vqa("What colour is the cat?")
    >>> prompt.text
    '<image>What colour is the cat?\\nAnswer the question using a single word or phrase. Answer:'
    >>> prompt.processor_kwargs
    {'return_for_text_completion': True}
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

from tl_vlm.eval.examples import Example

VQA_INSTRUCTION = "Answer the question using a single word or phrase."
# The authors' PROMT_PIXTRAL: a triple-quoted string whose lines end in a backslash, so
# the items are joined with no separator.
LONG_VQA_INSTRUCTION = (
    "- Answer the question using a single word, number, or short phrase. Use as few words "
    "as possible.- If the answer is a number, report it as a number, i.e. 2, not Two, and "
    "only include the number without any unit.- If the question is Yes/No, answer with "
    "Yes/No, and nothing else (no likely, unknown, etc.).- You cannot answer that the "
    "question is unanswerable. You must answer."
)
CAPTION_INSTRUCTION = "Provide a one-sentence caption for the provided image."

STYLES = ("paper", "clean", "chat")
VQA_MODES = ("zero-shot", "prompt")
TASKS = ("vqa", "caption", "imagenet")


class PromptError(ValueError):
    """A prompt cannot be built as asked (no chat template, wrong image markers, ...).

    Example:
        >>> PromptBuilder("chameleon", "<image>").vqa("What is <image>?")
        Traceback (most recent call last):
        ...
        tl_vlm.eval.prompts.PromptError: the paper vqa prompt holds 2 image markers ('<image>'), expected exactly one: '<image>What is <image>?...
    """


@dataclass(frozen=True)
class Prompt:
    """A prompt's text and the processor arguments it needs.

    Example:
        >>> p = Prompt("<image>Describe it.", {"return_for_text_completion": True})
        >>> p.text.count("<image>"), dict(p.processor_kwargs)
        (1, {'return_for_text_completion': True})
    """

    text: str
    processor_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Template:
    """One family's prompt for one task.

    Attributes:
        text: a format string with ``{img}`` (the image placeholder), ``{question}``
            (VQA), ``{text}`` (ImageNet: the row's text), ``{long}`` (the long VQA
            instruction) and ``{sq}`` (one of the authors' stray quotes: ``"`` in the
            ``paper`` style, nothing in ``clean``). With ``via_chat_template`` it is the
            user turn's text and the image goes first.
        processor_kwargs: arguments for the processor call.
        via_chat_template: render through the processor's chat template (Emu3's VQA).
        turn_tokens: put BOS before and EOS after each ``USER:``/``ASSISTANT:`` turn, as
            the authors' Emu3 preprocessing (``add_bos_eos``) does.

    Example:
        >>> Template('{sq}{img}USER:{question}{sq}').format(
        ...     "paper", img="<image>", question="Why?")
        '"<image>USER:Why?"'
    """

    text: str
    processor_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    via_chat_template: bool = False
    turn_tokens: bool = False

    def format(self, style: str, **fields: str) -> str:
        quote = '"' if style == "paper" else ""
        return self.text.format(sq=quote, long=LONG_VQA_INSTRUCTION, **fields)


_COMPLETION = {"return_for_text_completion": True}   # Chameleon: no <sep> appended
_CHAT_MODE = {"return_for_text_completion": False}   # Chameleon: <sep> appended (chat)
_ANSWER = "\nAnswer the question using a single word or phrase. Answer:"

# Keys: "vqa" (zero-shot), "vqa-prompt" (the long instruction), "caption", "imagenet".
GENERIC: dict[str, Template] = {
    "vqa": Template("{img}{question}" + _ANSWER),
    "vqa-prompt": Template("{img}{question}\n{long}"),
    "caption": Template("{img}" + CAPTION_INSTRUCTION),
    "imagenet": Template("{img} {text}"),
}

PAPER_TEMPLATES: dict[str, dict[str, Template]] = {
    "chameleon": {
        "vqa": Template("{img}{question}" + _ANSWER, _COMPLETION),
        "vqa-prompt": Template("{img}{question}\n{long}", _CHAT_MODE),
        "caption": Template("{img}" + CAPTION_INSTRUCTION, _COMPLETION),
        "imagenet": Template("{img} {text}", _COMPLETION),
    },
    "llava_onevision": {
        "vqa": Template("<|im_start|>{img}<|im_end|>{question}" + _ANSWER),
        "vqa-prompt": Template("<|im_start|>{img}<|im_end|>{question}\n{long}"),
        "caption": Template("<|im_start|>{img}<|im_end|>USER: " + CAPTION_INSTRUCTION
                            + " ASSISTANT:"),
        "imagenet": Template("<s><|im_start|>{img}<|im_end|> {text}"),
    },
    "pixtral": {
        "vqa": Template("[INST]<s>{img}{question}{sq}\n" + VQA_INSTRUCTION + "{sq}[/INST]"),
        "vqa-prompt": Template("[INST]<s>{img}{question}{long}[/INST]"),
        "caption": Template("[INST]{sq}<s>{img} " + CAPTION_INSTRUCTION + "{sq}[/INST]"),
        "imagenet": Template("<s>{img} {text}"),
    },
    "janus": {
        "vqa": Template("{sq}{img}USER:{question}{sq}\n" + VQA_INSTRUCTION
                        + "{sq}\nASSISTANT:{sq}"),
        "vqa-prompt": Template("{sq}{img}USER:{question}{sq}\n" + VQA_INSTRUCTION[:-1]
                               + "{long}.{sq}\nASSISTANT:{sq}"),
        "caption": Template("{img}USER:" + CAPTION_INSTRUCTION + " ASSISTANT:"),
        "imagenet": Template("{img} {text}"),
    },
    "emu3": {
        "vqa": Template("\n{question}", via_chat_template=True, turn_tokens=True),
        "vqa-prompt": Template("\n{question}" + VQA_INSTRUCTION, via_chat_template=True,
                               turn_tokens=True),
        "caption": Template("USER:{img}\nDescribe this picture briefly ASSISTANT:",
                            turn_tokens=True),
        "imagenet": Template("{img} {text}"),
    },
}


def emu3_turn_tokens(text: str, bos: str, eos: str) -> str:
    """The authors' Emu3 ``add_bos_eos``: BOS first, and EOS + BOS before every
    space-separated ``USER:``/``ASSISTANT:`` after the first word; trailing spaces go.

    Example:
        >>> emu3_turn_tokens("USER: <image>\\nWhy? ASSISTANT:  ", "<B>", "<E>")
        '<B>USER: <image>\\nWhy?<E><B>ASSISTANT:'
    """
    words = text.split(" ")
    out = bos + words[0]
    for word in words[1:]:
        if word in ("USER:", "ASSISTANT:"):
            out = out.strip() + eos + bos + word
        else:
            out += " " + word
    return out.strip()


class PromptBuilder:
    """Builds one family's prompts in one style (see the module docstring).

    Args:
        family: the tl_vlm family name (``model.family.name``); families without the
            authors' templates use :data:`GENERIC`.
        placeholder: the family's image placeholder (``model.layout.placeholder``).
        processor: the checkpoint's processor (needed for ``chat`` and Emu3's VQA).
        style: ``"paper"``, ``"clean"`` or ``"chat"``.
        vqa_mode: ``"zero-shot"`` or ``"prompt"``.
        count_placeholders: counts image markers in a prompt (default: occurrences of
            ``placeholder``); a prompt must hold exactly one.

    Example:
        >>> b = PromptBuilder("pixtral", "[IMG]", style="clean")
        >>> b.caption().text
        '[INST]<s>[IMG] Provide a one-sentence caption for the provided image.[/INST]'
        >>> PromptBuilder("pixtral", "[IMG]").caption().text
        '[INST]"<s>[IMG] Provide a one-sentence caption for the provided image."[/INST]'
        >>> PromptBuilder("gemma3", "<start_of_image>").imagenet("This animal is a").text
        '<start_of_image> This animal is a'
        >>> PromptBuilder("pixtral", "[IMG]", style="fancy")
        Traceback (most recent call last):
        ...
        ValueError: style must be one of ('paper', 'clean', 'chat'), got 'fancy'
    """

    def __init__(self, family: str, placeholder: str, processor: Any = None,
                 style: str = "paper", vqa_mode: str = "zero-shot",
                 count_placeholders: Optional[Callable[[str], int]] = None) -> None:
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if vqa_mode not in VQA_MODES:
            raise ValueError(f"vqa_mode must be one of {VQA_MODES}, got {vqa_mode!r}")
        self.family, self.placeholder, self.processor = family, placeholder, processor
        self.style, self.vqa_mode = style, vqa_mode
        self.count_placeholders = count_placeholders or (lambda text: text.count(placeholder))
        self.templates = PAPER_TEMPLATES.get(family, GENERIC)
        if style == "chat":
            self._chat_template()  # fail now, not on the first example

    @classmethod
    def for_model(cls, model: Any, style: str = "paper",
                  vqa_mode: str = "zero-shot") -> "PromptBuilder":
        """The builder for a loaded :class:`~tl_vlm.core.model.HookedVLM`.

        Example:
            >>> from tl_vlm import HookedVLM
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> PromptBuilder.for_model(model, style="chat")
            Traceback (most recent call last):
            ...
            tl_vlm.eval.prompts.PromptError: style='chat' needs the checkpoint's chat template, but its processor (ChameleonProcessor) has none; use style='paper' or 'clean', or set processor.chat_template
        """
        return cls(model.family.name, model.layout.placeholder, model.processor, style,
                   vqa_mode, count_placeholders=model.layout.count_placeholders)

    # -- per task ----------------------------------------------------------------------
    def vqa(self, question: str) -> Prompt:
        """A VQA prompt (zero-shot, or the long instruction with ``vqa_mode="prompt"``).

        Example:
            >>> PromptBuilder("janus", "<image_placeholder>").vqa("Why?").text
            '"<image_placeholder>USER:Why?"\\nAnswer the question using a single word or phrase."\\nASSISTANT:"'
            >>> long = PromptBuilder("chameleon", "<image>", vqa_mode="prompt").vqa("Why?")
            >>> long.text.startswith("<image>Why?\\n- Answer"), dict(long.processor_kwargs)
            (True, {'return_for_text_completion': False})
        """
        instruction = VQA_INSTRUCTION if self.vqa_mode == "zero-shot" else LONG_VQA_INSTRUCTION
        key = "vqa" if self.vqa_mode == "zero-shot" else "vqa-prompt"
        return self._render(key, f"{question}\n{instruction}", question=question)

    def caption(self) -> Prompt:
        """The captioning prompt.

        Example:
            >>> PromptBuilder("llava_onevision", "<image>").caption().text
            '<|im_start|><image><|im_end|>USER: Provide a one-sentence caption for the provided image. ASSISTANT:'
        """
        return self._render("caption", CAPTION_INSTRUCTION)

    def imagenet(self, text: str) -> Prompt:
        """The ImageNet prompt: the image, then the row's own ``text``.

        Example:
            >>> PromptBuilder("chameleon", "<image>").imagenet("This animal is a").text
            '<image> This animal is a'
        """
        return self._render("imagenet", text, text=text)

    def render(self, task: str, example: Example) -> Prompt:
        """The prompt of ``example`` for ``task`` (``"vqa"``: its prompt is the question;
        ``"imagenet"``: its prompt is the row's text; ``"caption"``: ignored).

        Example:
            >>> b = PromptBuilder("chameleon", "<image>")
            >>> b.render("imagenet", Example("This animal is a")).text
            '<image> This animal is a'
        """
        if task == "vqa":
            return self.vqa(example.prompt)
        if task == "caption":
            return self.caption()
        if task == "imagenet":
            return self.imagenet(example.prompt)
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def apply(self, task: str, examples: Sequence[Example]) -> tuple[list[Example], dict]:
        """``examples`` with their prompts rendered, and the processor arguments they
        share (to pass to ``prepare``).

        Example:
            >>> b = PromptBuilder("chameleon", "<image>")
            >>> done, kwargs = b.apply("vqa", [Example("Why?"), Example("Who?")])
            >>> [ex.prompt.split("\\n")[0] for ex in done], kwargs
            (['<image>Why?', '<image>Who?'], {'return_for_text_completion': True})
        """
        prompts = [self.render(task, ex) for ex in examples]
        kwargs = [dict(p.processor_kwargs) for p in prompts]
        if any(k != kwargs[0] for k in kwargs):
            raise PromptError(f"the prompts of one task need different processor arguments: "
                              f"{kwargs}")
        return ([replace(ex, prompt=p.text) for ex, p in zip(examples, prompts)],
                kwargs[0] if kwargs else {})

    def record(self) -> dict[str, Any]:
        """What to save with a run to say which prompts it used.

        Example:
            >>> PromptBuilder("qwen2_vl", "<|vision_start|><|image_pad|><|vision_end|>").record()
            {'prompt_set': 'paper', 'vqa_mode': 'zero-shot', 'family': 'qwen2_vl', 'templates': 'generic'}
        """
        out = {"prompt_set": self.style, "vqa_mode": self.vqa_mode, "family": self.family,
               "templates": self.family if self.family in PAPER_TEMPLATES else "generic"}
        uses_chat = self.style == "chat" or any(t.via_chat_template
                                                for t in self.templates.values())
        template = getattr(self.processor, "chat_template", None)
        if uses_chat and isinstance(template, str):
            out["chat_template_sha1"] = hashlib.sha1(template.encode()).hexdigest()
        return out

    # -- rendering ---------------------------------------------------------------------
    def _render(self, key: str, chat_text: str, **fields: str) -> Prompt:
        template = self.templates[key]
        if self.style == "chat":
            text, kwargs = self._chat([{"type": "image"}, {"type": "text", "text": chat_text}],
                                      add_generation_prompt=True), {}
            if self.family == "chameleon":
                kwargs = dict(_COMPLETION)  # the template ends the turn; no <sep> after it
            kwargs.update(self._no_second_bos(text))
        elif template.via_chat_template:
            user = template.format(self.style, **fields)
            text = self._chat([{"type": "image"}, {"type": "text", "text": user}],
                              assistant="", add_generation_prompt=False)
            kwargs = dict(template.processor_kwargs)
        else:
            text = template.format(self.style, img=self.placeholder, **fields)
            kwargs = dict(template.processor_kwargs)
        if template.turn_tokens and self.style != "chat":
            tok = getattr(self.processor, "tokenizer", self.processor)
            if tok is None or tok.bos_token is None or tok.eos_token is None:
                raise PromptError(f"{self.family} prompts put BOS/EOS around each turn: pass "
                                  f"the processor (its tokenizer names them)")
            text = emu3_turn_tokens(text, tok.bos_token, tok.eos_token)
        found = self.count_placeholders(text)
        if found != 1:
            raise PromptError(f"the {self.style} {key} prompt holds {found} image markers "
                              f"({self.placeholder!r}), expected exactly one: {text!r}")
        return Prompt(text, kwargs)

    def _chat_template(self) -> str:
        template = getattr(self.processor, "chat_template", None)
        if not template:
            raise PromptError(
                f"style={self.style!r} needs the checkpoint's chat template, but its "
                f"processor ({type(self.processor).__name__}) has none; use style='paper' "
                f"or 'clean', or set processor.chat_template")
        return template

    def _chat(self, user: list[dict], add_generation_prompt: bool,
              assistant: Optional[str] = None) -> str:
        if not self.processor or not getattr(self.processor, "chat_template", None):
            raise PromptError(
                f"the {self.family} {self.style} VQA prompt is rendered with the "
                f"checkpoint's chat template (as the authors did), but the processor "
                f"({type(self.processor).__name__}) has none; set processor.chat_template")
        messages = [{"role": "user", "content": user}]
        if assistant is not None:
            messages.append({"role": "assistant", "content": [{"type": "text",
                                                               "text": assistant}]})
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _no_second_bos(self, text: str) -> dict:
        """A chat template that writes BOS itself must not get a second one."""
        tok = getattr(self.processor, "tokenizer", self.processor)
        bos = getattr(tok, "bos_token", None)
        return {"add_special_tokens": False} if bos and text.startswith(bos) else {}
