"""Which token stands for an answer word: one policy for tasks, patching and the CLI.

Closed-set scoring ("is logit(cat) above logit(dog)?") and steering scores read one
token per class name. The token is the **first token that carries the word** when the
word follows a space (``" cat"``), as the model would write it after ``Answer:``.
Tokenizers disagree on how that looks:

- byte-level BPE (GPT-2, Qwen, Mistral-Nemo): ``" cat"`` -> ``"Ġcat"``;
- SentencePiece with a prepended ``"▁"`` (Llama/Vicuna, LLaVA-1.5, Chameleon): ``" cat"``
  can come out as ``["▁", "▁cat"]`` or ``["▁", "c", "at"]``: the bare ``"▁"`` piece carries
  no word and is skipped (taking it would make every answer the same token);
- word-level vocabularies (tl_vlm's toy models): ``"cat"``.

Errors, never silent wrong answers: a word the tokenizer only knows as its unknown token
is refused, and so is a closed set in which two answers share their first token (the
scorer could not tell them apart). A word that takes several tokens is scored by its
first one, with one warning.

Example:
    >>> from tl_vlm import HookedVLM
    >>> tok = HookedVLM.from_pretrained("toy-gated").tokenizer
    >>> answer_token_id(tok, "red"), tok.convert_ids_to_tokens(18)
    (18, 'red')
    >>> answer_token_ids(tok, ["red", "blue", "red"]).tolist()
    [18, 20, 18]
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

_warned: set[tuple[int, str]] = set()


class AnswerTokenError(ValueError):
    """An answer word has no usable token, or a closed set's answers collide.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> tok = HookedVLM.from_pretrained("toy-gated").tokenizer
        >>> try:
        ...     answer_token_id(tok, "zzz")
        ... except AnswerTokenError as err:
        ...     print(type(err).__mro__[1].__name__)     # also a ValueError
        ValueError
    """


def word_tokens(tokenizer: Any, answer: str) -> list[int]:
    """The token ids of ``answer`` as it follows a space, without pieces that carry no
    word (a bare ``"▁"``/``"Ġ"``/space).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> tok = HookedVLM.from_pretrained("toy-gated").tokenizer
        >>> word_tokens(tok, "top-left")
        [26]
    """
    if not isinstance(answer, str) or not answer.strip():
        raise AnswerTokenError(f"an answer must be a non-empty word, got {answer!r}")
    ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids if tokenizer.decode([int(i)]).strip()]


def answer_token_id(tokenizer: Any, answer: str) -> int:
    """The first token that carries ``answer`` (see the module docstring).

    Raises :class:`AnswerTokenError` for a word the tokenizer cannot write except as its
    unknown token; warns once per word that takes several tokens.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> tok = HookedVLM.from_pretrained("toy-gated").tokenizer
        >>> answer_token_id(tok, " blue ")                 # surrounding spaces do not matter
        20
        >>> answer_token_id(tok, "aubergine")
        Traceback (most recent call last):
        ...
        tl_vlm.core.answers.AnswerTokenError: answer 'aubergine' is not in the vocabulary ...
    """
    ids = word_tokens(tokenizer, answer)
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or ids[0] == unk:
        raise AnswerTokenError(
            f"answer {answer!r} is not in the vocabulary (it tokenizes to "
            f"{tokenizer.convert_ids_to_tokens(ids) or 'nothing'}); check its spelling, or "
            f"use a word the model's tokenizer knows")
    if len(ids) > 1 and (id(tokenizer), answer) not in _warned:
        _warned.add((id(tokenizer), answer))
        warnings.warn(
            f"answer {answer!r} takes {len(ids)} tokens {tokenizer.convert_ids_to_tokens(ids)}; "
            f"it is scored by its first token {tokenizer.convert_ids_to_tokens(ids[:1])}",
            stacklevel=2)
    return ids[0]


def answer_token_ids(tokenizer: Any, answers: Sequence[str], closed_set: bool = False,
                     on_collision: Literal["error", "merge"] = "error") -> Int[Tensor, "n"]:
    """:func:`answer_token_id` of each answer, as a tensor.

    With ``closed_set=True`` the answers are the candidates of one closed-set question:
    two different answers with the same first token raise :class:`AnswerTokenError`
    naming them, unless ``on_collision="merge"`` (they then count as one class, e.g.
    ImageNet's several dog breeds starting with " dog").

    Example:
        >>> from tl_vlm import HookedVLM
        >>> tok = HookedVLM.from_pretrained("toy-gated").tokenizer
        >>> answer_token_ids(tok, ["red", "green"], closed_set=True).tolist()
        [18, 19]
        >>> answer_token_ids(tok, ["red", "red  "], closed_set=True).tolist()   # same word
        [18, 18]
    """
    if on_collision not in ("error", "merge"):
        raise ValueError(f"on_collision must be 'error' or 'merge', got {on_collision!r}")
    ids = [answer_token_id(tokenizer, a) for a in answers]
    if closed_set and on_collision == "error":
        words: dict[int, set[str]] = {}
        for a, i in zip(answers, ids):
            words.setdefault(i, set()).add(a.strip())
        clashes = {i: sorted(w) for i, w in words.items() if len(w) > 1}
        if clashes:
            i, names = next(iter(clashes.items()))
            raise AnswerTokenError(
                f"answers {names} share their first token {tokenizer.convert_ids_to_tokens([i])} "
                f"({len(clashes)} such group(s)): a closed-set score cannot tell them apart. "
                f"Rename them so their first tokens differ, or merge them explicitly "
                f"(on_collision='merge')")
    return torch.tensor(ids, dtype=torch.long)
