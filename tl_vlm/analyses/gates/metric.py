"""The differentiable score whose drop measures a knockout, and its targets.

Example:
    >>> import torch
    >>> from tl_vlm.analyses.gates import GateMetric
    >>> round(GateMetric()(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).item(), 3)
    2.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass
class GateMetric:
    """The differentiable score whose drop measures a knockout: per example, the log-odds
    ``logit[target] - logsumexp(logits of the other candidates)`` at the last position
    (``kind="log_odds"``, which does not saturate when the model is sure), or the log
    probability of the target (``"logprob"``). Candidates are the task's closed set of
    answers for the example's question kind when it has one, else the whole vocabulary.

    Targets: a :class:`~tl_vlm.eval.tasks.NextTokenTask`'s answers; for any other task the
    clean model's own greedy next token.

    Example:
        >>> import torch
        >>> metric = GateMetric("log_odds")
        >>> logits = torch.tensor([[2.0, 0.0, 0.0, -1.0]])
        >>> round(metric(logits, torch.tensor([0]))[0].item(), 3)                   # 2 - log 2.37
        1.138
        >>> allowed = torch.tensor([[True, True, False, False]])
        >>> metric(logits, torch.tensor([0]), allowed).tolist()                     # closed set
        [2.0]
        >>> round(GateMetric("logprob")(logits, torch.tensor([0]), allowed).item(), 3)
        -0.127
    """

    kind: Literal["log_odds", "logprob"] = "log_odds"

    def __post_init__(self) -> None:
        if self.kind not in ("log_odds", "logprob"):
            raise ValueError(f"metric must be 'log_odds' or 'logprob', got {self.kind!r}")

    def __call__(self, logits: Float[Tensor, "batch vocab"], targets: Int[Tensor, "batch"],
                 allowed: Optional[Bool[Tensor, "batch vocab"]] = None) -> Float[Tensor, "batch"]:
        logits = logits.float()
        targets = targets.to(logits.device)
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        target = logits.gather(1, targets[:, None])[:, 0]
        if self.kind == "logprob":
            return target - logits.logsumexp(-1)
        others = logits.scatter(1, targets[:, None], float("-inf"))
        return target - others.logsumexp(-1)


class AnswerTargets:
    """Per-batch targets and allowed answers of the metric, from the task: a
    :class:`~tl_vlm.eval.tasks.NextTokenTask`'s answers (and, for a closed-set task, the
    answers of each question kind as the allowed ones); for any other task the clean
    model's own greedy next token (``clean_last``: the last position's logits).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.eval.tasks import toy_task
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> task = toy_task(4)
        >>> targets = AnswerTargets(model, task)
        >>> batch = task.prepare(model, task.examples)
        >>> ids, allowed = targets(task.examples, model.last_logits(batch).detach())
        >>> bool(allowed[torch.arange(4), ids].all())         # each target is allowed, and
        True
        >>> allowed.sum(1).tolist()          # the task's other answers to the same kind of question
        [2, 1, 1, 2]
    """

    def __init__(self, model, task) -> None:
        from tl_vlm.core.answers import answer_token_ids

        self.model = model
        self.task = task
        self.answers = callable(getattr(task, "answer_ids", None))   # a NextTokenTask
        self.closed: Optional[dict[Any, Tensor]] = None
        if self.answers and getattr(task, "closed_set", False) \
                and all(ex.kind is not None for ex in task.examples):
            words: dict[Any, set] = {}
            for ex in task.examples:
                words.setdefault(ex.kind, set()).add(ex.answers[0])
            tok = model.layout.tokenizer
            self.closed = {kind: answer_token_ids(tok, sorted(w), closed_set=True,
                                                  on_collision=getattr(task, "on_collision", "error"))
                           for kind, w in words.items()}

    def __call__(self, examples, clean_last: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        if self.answers:
            targets = self.task.answer_ids(self.model, examples)
        else:
            targets = clean_last.argmax(-1).cpu()
        if self.closed is None:
            return targets, None
        allowed = torch.zeros(len(examples), clean_last.shape[-1], dtype=torch.bool)
        for b, ex in enumerate(examples):
            allowed[b, self.closed[ex.kind]] = True
        return targets, allowed
