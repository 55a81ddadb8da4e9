"""Accuracy of a toy model on a toy dataset, clean or under the paper's knockouts.

The prediction of an example is its question type's answer with the highest logit at
the last prompt position (closed-set: four candidates), so chance is exactly 1/4 on a
balanced set (:func:`tl_vlm.toy.task.chance_level`). ``strict`` accuracy instead takes
the argmax over the whole vocabulary (what greedy generation would answer).

Example:
    >>> from tl_vlm import HookedVLM                                       # doctest: +SKIP
    >>> from tl_vlm.toy import toy_model_path, make_examples, evaluate
    >>> model = HookedVLM.from_pretrained(str(toy_model_path("toy-gated")))
    >>> evaluate(model, make_examples(300)).accuracy
    >>> evaluate(model, make_examples(300), condition="eoi").accuracy
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from tl_vlm.toy.task import QUESTION_TYPES, ToyDataset, chance_level

# condition name -> hooks for a batch (the paper's knockouts, all layers, "zero")
CONDITIONS = ("clean", "eoi", "img2text", "random10")


def condition_hooks(model, batch, condition: str, seed: int = 0,
                    method: str = "zero") -> list:
    """Hooks of a named condition: ``clean``, ``eoi`` (gate knockout), ``img2text``
    (image -> text knockout) or ``random10`` (10 random image tokens, seeded)."""
    from tl_vlm.analyses.knockout import (gate_knockout, image_to_text_knockout,
                                          random_image_knockout)

    if condition == "clean":
        return []
    if condition == "eoi":
        return gate_knockout(model, batch, method=method)
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
                batch_size: int = 150) -> torch.Tensor:
    """``[n, vocab]`` logits at the last prompt token of every example.

    ``hooks`` is a condition name (see :data:`CONDITIONS`) or a function
    ``(model, batch) -> fwd_hooks``.
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


def score(logits: torch.Tensor, data: ToyDataset) -> ToyScore:
    """Accuracies from the last-token logits of ``data``."""
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
    ``seeds`` (the paper's 3-5 draws)."""
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
    """Every condition of :data:`CONDITIONS`."""
    return {c: evaluate(model, data, c, batch_size=batch_size) for c in conditions}


def format_scores(scores: dict[str, ToyScore], name: Optional[str] = None) -> str:
    """A small text table (one row per condition)."""
    head = f"{name}\n" if name else ""
    lines = [f"{'condition':>10}  {'acc':>6}  {'strict':>6}  colour  shape  position"]
    for c, s in scores.items():
        pq = s.per_question
        lines.append(f"{c:>10}  {s.accuracy:6.3f}  {s.strict:6.3f}  {pq.get('colour', 0):6.3f} "
                     f"{pq.get('shape', 0):6.3f}  {pq.get('position', 0):8.3f}")
    return head + "\n".join(lines)
