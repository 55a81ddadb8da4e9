"""Accuracy of a toy model on a toy dataset, clean or under the paper's knockouts.

The prediction of an example is its question type's answer with the highest logit at
the last prompt position (closed-set: four candidates), so chance is exactly 1/4 on a
balanced set (:func:`tl_vlm.toy.task.chance_level`). ``strict`` accuracy instead takes
the argmax over the whole vocabulary (what greedy generation would answer).

Example:
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> data = make_examples(48)                       # held-out (evaluation stream)
    >>> evaluate(model, data).accuracy
    1.0
    >>> evaluate(model, data, condition="eoi").accuracy < 0.5     # near chance (0.25)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from tl_vlm.toy.task import QUESTION_TYPES, ToyDataset, chance_level

# condition name -> hooks for a batch (the paper's knockouts, all layers, "zero")
CONDITIONS = ("clean", "eoi", "last_image", "img2text", "random10")


def condition_hooks(model, batch, condition: str, seed: int = 0,
                    method: str = "zero") -> list:
    """Hooks of a named condition: ``clean``, ``eoi`` (gate knockout), ``last_image``
    (every position cut from the last image code: ``toy-last-image``'s gate),
    ``img2text`` (image -> text knockout) or ``random10`` (10 random image tokens, seeded).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> data = make_examples(24, seed=0)
        >>> batch = model.prepare(data.prompts)
        >>> condition_hooks(model, batch, "clean"), len(condition_hooks(model, batch, "eoi"))
        ([], 4)
        >>> condition_hooks(model, batch, "eoi", method="mask")[0][0]
        'blocks.0.attn.hook_attn_scores'
        >>> condition_hooks(model, batch, "boi")
        Traceback (most recent call last):
        ...
        ValueError: unknown condition 'boi'; choose from ('clean', 'eoi', 'last_image', 'img2text', 'random10')
    """
    from tl_vlm.analyses.knockout import (gate_knockout, image_to_text_knockout,
                                          knockout_hooks, random_image_knockout)

    if condition == "clean":
        return []
    if condition == "eoi":
        return gate_knockout(model, batch, method=method)
    if condition == "last_image":
        return knockout_hooks(model, batch, keys=batch.positions.last_image, method=method)
    if condition == "img2text":
        return image_to_text_knockout(model, batch, method=method)
    if condition == "random10":
        return random_image_knockout(model, batch, k=10, seed=seed, method=method)
    raise ValueError(f"unknown condition {condition!r}; choose from {CONDITIONS}")


@dataclass
class ToyScore:
    """Accuracies of one evaluation.

    Attributes:
        accuracy: closed-set accuracy (argmax over the question type's four answers).
        strict: argmax over the whole vocabulary equals the answer.
        per_question: closed-set accuracy per question type.
        chance: the question-only baseline (:func:`chance_level`).
        n: number of examples.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> data = make_examples(24, seed=0)
        >>> s = evaluate(model, data, condition="img2text")   # toy-gated does not need the codes
        >>> s.as_dict()
        {'accuracy': 1.0, 'strict': 1.0,
         'per_question': {'colour': 1.0, 'shape': 1.0, 'position': 1.0}, 'chance': 0.25, 'n': 24}
    """

    accuracy: float
    strict: float
    per_question: dict[str, float] = field(default_factory=dict)
    chance: float = 0.25
    n: int = 0

    def as_dict(self) -> dict:
        return dict(accuracy=round(self.accuracy, 4), strict=round(self.strict, 4),
                    per_question={k: round(v, 4) for k, v in self.per_question.items()},
                    chance=round(self.chance, 4), n=self.n)


@torch.no_grad()
def last_logits(model, data: ToyDataset, hooks: Union[None, str, Callable] = None,
                batch_size: int = 150) -> Float[Tensor, "n vocab"]:
    """``[n, vocab]`` logits at the last prompt token of every example.

    ``hooks`` is a condition name (see :data:`CONDITIONS`) or a function
    ``(model, batch) -> fwd_hooks``.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> data = make_examples(24, seed=0)
        >>> logits = last_logits(model, data, batch_size=10)      # three batches
        >>> logits.shape
        torch.Size([24, 54])
        >>> logits.argmax(-1).tolist() == data.answer_ids
        True
        >>> blind = last_logits(model, data, lambda model, batch: condition_hooks(model, batch, "eoi"))
        >>> blind.shape
        torch.Size([24, 54])
    """
    out = []
    for start in range(0, len(data), batch_size):
        chunk = data[start:start + batch_size]
        batch = model.prepare(chunk.prompts)
        if hooks is None:
            fwd = []
        elif isinstance(hooks, str):
            fwd = condition_hooks(model, batch, hooks)
        else:
            fwd = hooks(model, batch)
        logits = model.run_with_hooks(batch, fwd_hooks=fwd) if fwd else model(batch)
        last = batch.positions.last.mask.to(logits.device)
        out.append(logits[last].float().cpu())
    return torch.cat(out)


def score(logits: Float[Tensor, "n vocab"], data: ToyDataset) -> ToyScore:
    """Accuracies from the last-token logits of ``data``.

    Example:
        >>> from tl_vlm.toy import make_examples
        >>> data = make_examples(12, seed=0)
        >>> logits = torch.zeros(12, 54)
        >>> logits[torch.arange(12), torch.tensor(data.answer_ids)] = 1.0   # always right
        >>> s = score(logits, data)
        >>> s.accuracy, s.strict, s.chance, s.n
        (1.0, 1.0, 0.25, 12)
    """
    cands = torch.tensor(data.candidate_ids)
    labels = torch.tensor(data.labels)
    answer = torch.tensor(data.answer_ids)
    choice = logits.gather(1, cands).argmax(-1) == labels
    strict = logits.argmax(-1) == answer
    per_q = {}
    questions = data.questions
    for q in QUESTION_TYPES:
        idx = [i for i, x in enumerate(questions) if x == q]
        if idx:
            per_q[q] = float(choice[idx].float().mean())
    return ToyScore(float(choice.float().mean()), float(strict.float().mean()), per_q,
                    chance_level(data), len(data))


def evaluate(model, data: ToyDataset, condition: Union[str, Callable] = "clean",
             seeds: Sequence[int] = (0, 1, 2), batch_size: int = 150) -> ToyScore:
    """Score a model on ``data`` under a condition; ``random10`` is averaged over
    ``seeds`` (the paper's 3-5 draws).

    ``condition`` is a name of :data:`CONDITIONS` or a function ``(model, batch) ->
    fwd_hooks``.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-distributed")    # text reads the codes directly
        >>> data = make_examples(24, seed=0)
        >>> evaluate(model, data, condition="eoi").accuracy          # the gate carries nothing
        1.0
        >>> evaluate(model, data, condition="img2text").accuracy     # blind without the codes
        0.25
        >>> s = evaluate(model, data, condition="random10", seeds=(0, 1))
        >>> sorted(s.per_question), s.n
        (['colour', 'position', 'shape'], 24)
    """
    if condition == "random10":
        scores = [score(last_logits(model, data, _random(seed), batch_size), data)
                  for seed in seeds]
        return ToyScore(
            sum(s.accuracy for s in scores) / len(scores),
            sum(s.strict for s in scores) / len(scores),
            {q: sum(s.per_question[q] for s in scores) / len(scores)
             for q in scores[0].per_question},
            scores[0].chance, len(data))
    hooks = None if condition == "clean" else condition
    return score(last_logits(model, data, hooks, batch_size), data)


def _random(seed: int) -> Callable:
    return lambda model, batch: condition_hooks(model, batch, "random10", seed=seed)


def evaluate_all(model, data: ToyDataset, conditions: Sequence[str] = CONDITIONS,
                 batch_size: int = 150) -> dict[str, ToyScore]:
    """Every condition of :data:`CONDITIONS` (or of ``conditions``), by name.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> data = make_examples(24, seed=0)
        >>> scores = evaluate_all(model, data, conditions=("clean", "eoi"))
        >>> {name: s.accuracy > 0.5 for name, s in scores.items()}
        {'clean': True, 'eoi': False}
    """
    return {c: evaluate(model, data, c, batch_size=batch_size) for c in conditions}


def format_scores(scores: dict[str, ToyScore], name: Optional[str] = None) -> str:
    """A small text table (one row per condition).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> data = make_examples(24, seed=0)
        >>> print(format_scores(evaluate_all(model, data, ("clean", "img2text")), "toy-gated"))
        toy-gated
         condition     acc  strict  colour  shape  position
             clean   1.000   1.000   1.000  1.000     1.000
          img2text   1.000   1.000   1.000  1.000     1.000
    """
    head = f"{name}\n" if name else ""
    lines = [f"{'condition':>10}  {'acc':>6}  {'strict':>6}  colour  shape  position"]
    for c, s in scores.items():
        pq = s.per_question
        lines.append(f"{c:>10}  {s.accuracy:6.3f}  {s.strict:6.3f}  {pq.get('colour', 0):6.3f} "
                     f"{pq.get('shape', 0):6.3f}  {pq.get('position', 0):8.3f}")
    return head + "\n".join(lines)
