"""Image-understanding tasks that the main job evaluates a model on.

A :class:`Task` is a list of :class:`Example` (a question, its images, the accepted
answers or reference captions, a class label) plus two rules, kept apart so that a run
can be re-scored without the model:

- :meth:`Task.predict` runs the model on a batch (with any hooks, e.g. a knockout) and
  returns :class:`Predictions`: what the model said, one JSON value per example;
- :meth:`Task.evaluate` turns the predictions of a whole set into an
  :class:`Evaluation` (the task's metric, per-example scores, further numbers), under
  :class:`Scoring` options (VQA normalisation, CIDEr tokenisation, answer extraction).

Three kinds cover the paper's tasks:

- :class:`NextTokenTask`: the answer is one token, read off the greedy next token over
  the answers of the example's kind (ImageNet classification by prompt completion, the
  toy models' one-word answers); optionally keeps the last token's final-layer residual
  for the label overlap chi_out.
- :class:`GenerationTask`: greedy generation (20 new tokens), VQA accuracy as the
  official evaluation computes it (:func:`tl_vlm.eval.metrics.vqa_accuracy`).
- :class:`CaptionTask`: greedy generation (60 new tokens), CIDEr-D over the whole set
  (:func:`tl_vlm.eval.metrics.cider_d`).

A task with a ``prompt_kind`` (``"vqa"``, ``"caption"``, ``"imagenet"``) wraps each
example's text in the model family's template (:mod:`tl_vlm.eval.prompts`) when it prepares
a batch; without one the example's prompt is used as is (the toy task).

Example:
    >>> from tl_vlm import HookedVLM
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> task = toy_task(24)                                 # a NextTokenTask
    >>> for start, examples in task.batches(12):
    ...     batch = task.prepare(model, examples)
    ...     predicted = task.predict(model, batch, examples)
    ...     print(start, predicted.outputs[:3], task.evaluate(examples, predicted).value)
    0 ['red', 'x', 'bottom-left'] 1.0
    12 ['green', 'square', 'top-right'] 1.0

    VQAv2 on a real checkpoint (the paper's 2000 questions, see :mod:`tl_vlm.eval.taskset`):

    >>> from tl_vlm.eval.taskset import load_task                           # doctest: +SKIP
    >>> task, source = load_task("vqav2")                              # doctest: +SKIP
"""

from __future__ import annotations

import abc
import json
import re
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.core.answers import answer_token_id, answer_token_ids  # noqa: F401  (re-exported)
from tl_vlm.eval.scoring import EXTRACT_MODES, Scoring  # noqa: F401  (re-exported)
from tl_vlm.core.batch import VLMBatch
from tl_vlm.eval.examples import (Example, LazyImage, TaskDataError,  # noqa: F401  (re-exported)
                                  check_image_file, load_image)

Hooks = Sequence[tuple[Union[str, Callable], Callable]]


@dataclass
class Predictions:
    """What a model said on some examples, in a form that can be saved and scored later.

    Attributes:
        outputs: one JSON value per example (the generated text, the predicted answer).
        extra: further per-example JSON columns the scorer needs (e.g. token ids).
        tensors: per-example tensors (first axis: the examples), saved as safetensors.

    Example:
        >>> p = Predictions(["red", "blue"], {"token": [18, 20]})
        >>> q = Predictions.concat([p, Predictions(["green"], {"token": [19]})])
        >>> q.outputs, q.extra
        (['red', 'blue', 'green'], {'token': [18, 20, 19]})
    """

    outputs: list
    extra: dict[str, list] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.outputs)

    @classmethod
    def concat(cls, parts: Sequence["Predictions"]) -> "Predictions":
        """The predictions of several batches, in order."""
        if not parts:
            return cls([])
        keys = [sorted(p.extra) for p in parts], [sorted(p.tensors) for p in parts]
        if any(k != keys[0][0] for k in keys[0]) or any(k != keys[1][0] for k in keys[1]):
            raise ValueError("the batches' predictions hold different columns; they come "
                             "from different tasks or settings")
        return cls([o for p in parts for o in p.outputs],
                   {k: [v for p in parts for v in p.extra[k]] for k in parts[0].extra},
                   {k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})




def extract_answer(text: str, mode: str = "full") -> str:
    """The answer in a generated continuation: line breaks and tabs become spaces and
    the ends are stripped (``"full"``, the authors' slicing), or only the first
    non-empty line is kept (``"first_line"``).

    Example:
        >>> extract_answer(" yes\\n\\nQuestion: is it"), extract_answer("yes\\nno", "first_line")
        ('yes  Question: is it', 'yes')
    """
    if mode == "first_line":
        return text.strip().split("\n")[0].strip()
    if mode != "full":
        raise ValueError(f"mode must be one of {EXTRACT_MODES}, got {mode!r}")
    return text.replace("\n", " ").replace("\t", " ").strip()


@dataclass
class Evaluation:
    """A task's scores on a set of examples.

    Attributes:
        metric: the name of the headline metric (``"vqa_accuracy"``, ``"cider"``, ...).
        value: the headline metric over the set.
        scores: per-example scores (CIDEr's depend on the whole set).
        metrics: further scores of the same predictions (the other VQA normalisation,
            CIDEr with other tokens, chi_out).
        details: facts about the set that do not depend on the predictions (chance,
            classes, their first-token collisions).

    Example:
        >>> Evaluation("accuracy", 0.5, [1.0, 0.0], details={"chance": 0.25}).to_dict()
        {'metric': 'accuracy', 'value': 0.5, 'metrics': {}, 'details': {'chance': 0.25}}
    """

    metric: str
    value: float
    scores: list[float]
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "metrics": self.metrics,
                "details": self.details}


@dataclass
class Task(abc.ABC):
    """A named list of examples with a model pass and a scoring rule (see the subclasses).

    Attributes:
        name: the task's name (``"vqav2"``, ``"toy"``, ...).
        examples: the examples, in evaluation order.
        padding_side: ``"left"`` (batched generation needs it) or ``"right"``.
        prompt_kind: ``"vqa"``, ``"caption"`` or ``"imagenet"``: wrap each example's text
            in the family's template (:class:`~tl_vlm.eval.prompts.PromptBuilder`); None: use
            the prompt as is.
        prompt_style: ``"paper"``, ``"clean"`` or ``"chat"``.
        vqa_mode: ``"zero-shot"`` or ``"prompt"`` (the authors' long instruction).
        class_pairs: ``(base, target)`` labels for steering: the study patches the gate
            of a ``target`` image into a ``base`` image (None: random pairs of one kind).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> task = NextTokenTask("toy", toy_task(30).examples, padding_side="right")
        >>> [(start, len(chunk)) for start, chunk in task.batches(12)]
        [(0, 12), (12, 12), (24, 6)]
        >>> [start for start, _ in task.batches(12, start=12)]       # resume mid-way
        [12, 24]
        >>> task.prepare(model, task.examples[:2]).padding_side
        'right'
        >>> Task("toy", task.examples)           # a task needs a model pass and a scorer
        Traceback (most recent call last):
        ...
        TypeError: Can't instantiate abstract class Task with abstract methods evaluate, predict
    """

    name: str
    examples: list[Example]
    padding_side: str = "left"
    prompt_kind: Optional[str] = None
    prompt_style: str = "paper"
    vqa_mode: str = "zero-shot"
    class_pairs: Optional[tuple[tuple[str, str], ...]] = None

    def __post_init__(self) -> None:
        self._builders: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self.examples)

    def batches(self, batch_size: int, start: int = 0) -> Any:
        """``(index of the first example, examples)`` chunks, from ``start`` on."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for i in range(start, len(self.examples), batch_size):
            yield i, self.examples[i:i + batch_size]

    def prompt_builder(self, model: Any) -> Any:
        """The :class:`~tl_vlm.eval.prompts.PromptBuilder` of ``model`` in this task's style."""
        if model not in self._builders:
            from tl_vlm.eval.prompts import PromptBuilder

            self._builders[model] = PromptBuilder.for_model(model, self.prompt_style,
                                                            self.vqa_mode)
        return self._builders[model]

    def render(self, model: Any, examples: Sequence[Example]) -> tuple[list[Example], dict]:
        """``examples`` with the family's prompts, and the processor arguments they need."""
        if self.prompt_kind is None:
            return list(examples), {}
        return self.prompt_builder(model).apply(self.prompt_kind, examples)

    def prepare(self, model: Any, examples: Sequence[Example]) -> VLMBatch:
        """A batch of ``examples`` (prompts rendered, images loaded now)."""
        asked, processor_kwargs = self.render(model, examples)
        images = [[load_image(im) for im in ex.images] or None for ex in asked]
        if all(im is None for im in images):
            images = None
        return model.prepare([ex.prompt for ex in asked], images=images,
                             padding_side=self.padding_side, **processor_kwargs)

    @abc.abstractmethod
    def predict(self, model: Any, batch: VLMBatch, examples: Sequence[Example],
                fwd_hooks: Hooks = ()) -> Predictions:
        """What the model says on ``batch`` with ``fwd_hooks`` active."""

    @abc.abstractmethod
    def evaluate(self, examples: Sequence[Example], predictions: Predictions,
                 scoring: Scoring = Scoring()) -> Evaluation:
        """Scores of ``predictions`` (one per example, in order); no model needed."""

    def score(self, model: Any, batch: VLMBatch, examples: Sequence[Example],
              fwd_hooks: Hooks = ()) -> Float[Tensor, "batch"]:
        """Per-example scores in [0, 1] of one batch (predict, then evaluate)."""
        evaluation = self.evaluate(examples, self.predict(model, batch, examples, fwd_hooks))
        return torch.tensor(evaluation.scores, dtype=torch.float)

    def score_from_logits(self, model: Any, examples: Sequence[Example],
                          last_logits: Float[Tensor, "batch vocab"]) -> Optional[Float[Tensor, "batch"]]:
        """The scores :meth:`score` would give, from the last position's logits of one
        forward over the prompts; None when the prediction needs more (generation).
        It lets an analysis that runs its own forward (with gradients, say) score the
        task from it instead of running the model once more."""
        return None

    def chance(self) -> Optional[float]:
        """Expected score of a guess that ignores the image (None when unknown)."""
        return None

    def settings(self) -> dict[str, Any]:
        """What fixes this task's predictions, for ``run.json``."""
        return {"task": self.name, "kind": type(self).__name__,
                "prompt_kind": self.prompt_kind,
                "prompt_style": self.prompt_style if self.prompt_kind else None,
                "vqa_mode": self.vqa_mode if self.prompt_kind == "vqa" else None}


def _chance_per_kind(kinds: Sequence[Any], candidates: Sequence[Any]) -> Optional[float]:
    """Mean over examples of 1 / (distinct candidates among the examples of its kind)."""
    if not kinds or any(k is None for k in kinds):
        return None
    per_kind: dict[Any, set] = {}
    for kind, candidate in zip(kinds, candidates):
        per_kind.setdefault(kind, set()).add(candidate)
    return sum(1 / len(per_kind[k]) for k in kinds) / len(kinds)


def overlap_k(n: int) -> int:
    """Neighbours for a label overlap on ``n`` points: 30 (the paper), at most n / 8.

    Example:
        >>> overlap_k(10000), overlap_k(24), overlap_k(3)
        (30, 3, 1)
    """
    return min(30, max(1, n // 8))


@dataclass
class NextTokenTask(Task):
    """One-token answers, read off the greedy next token at the last position.

    With ``closed_set`` (the default) and every example's ``kind`` known, the prediction
    is the best of the answers its kind admits (the paper's classification by prompt
    completion over the class names), so a blind guess scores exactly ``chance``;
    otherwise it is the argmax over the whole vocabulary. Answers whose first tokens
    coincide are an error, or one class with ``on_collision="merge"`` (ImageNet's
    ``" dog"`` breeds); the evaluation reports the collision rate.

    ``final_representation`` also keeps each example's last-token residual after the
    last block, and the evaluation adds ``chi_out``: its neighbourhood overlap with the
    labels (k = :func:`overlap_k`), the authors' FigA3 quantity.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.analyses.knockout import gate_knockout
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> task = toy_task(12)
        >>> batch = task.prepare(model, task.examples)                # left-padded
        >>> task.answer_ids(model, task.examples[:3])
        tensor([20, 24, 27])
        >>> task.score(model, batch, task.examples).mean().item(), task.chance()
        (1.0, 0.25)
        >>> blind = task.predict(model, batch, task.examples, gate_knockout(model, batch))
        >>> result = task.evaluate(task.examples, blind)
        >>> bool(result.value < 0.6), result.details["chance"]       # near chance without the gate
        (True, 0.25)
    """

    closed_set: bool = True
    on_collision: str = "error"
    final_representation: bool = False
    metric = "accuracy"

    def answer_ids(self, model: Any, examples: Sequence[Example]) -> Int[Tensor, "batch"]:
        """The token of each example's first answer (:func:`tl_vlm.core.answers.answer_token_id`)."""
        return answer_token_ids(model.layout.tokenizer, [ex.answers[0] for ex in examples])

    def _candidates(self, model: Any) -> Optional[dict[str, Tensor]]:
        """Answer token ids admitted by each question kind (None: open vocabulary)."""
        if not self.closed_set or any(ex.kind is None for ex in self.examples):
            return None
        tok = model.layout.tokenizer
        cache = self.__dict__.setdefault("_candidate_cache", {})
        if id(tok) not in cache:   # once per tokenizer: a task can hold 10k examples
            answers: dict[str, set] = {}
            for ex in self.examples:
                answers.setdefault(ex.kind, set()).add(ex.answers[0])
            with warnings.catch_warnings():
                if self.on_collision == "merge":
                    # Class names scored by their first token by design (ImageNet's
                    # "golden retriever"): one warning per name would be noise.
                    warnings.filterwarnings("ignore", message="answer .* takes .* tokens")
                cache[id(tok)] = {kind: answer_token_ids(tok, sorted(v), closed_set=True,
                                                         on_collision=self.on_collision).unique()
                                  for kind, v in answers.items()}
        return cache[id(tok)]

    @torch.no_grad()
    def predict(self, model: Any, batch: VLMBatch, examples: Sequence[Example],
                fwd_hooks: Hooks = ()) -> Predictions:
        kept: list[Tensor] = []
        hooks = list(fwd_hooks)
        if self.final_representation:
            last_mask = batch.positions.last.mask

            def keep(resid: Float[Tensor, "batch pos d_model"], hook) -> None:
                kept.append(resid[last_mask.to(resid.device)].float().cpu())

            hooks.append((f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", keep))
        last = model.last_logits(batch, fwd_hooks=hooks).float().cpu()   # [batch, vocab]
        predicted = self._predicted(model, examples, last)
        tok = model.layout.tokenizer
        extra = {"token": predicted.tolist(),
                 "answer_token": self.answer_ids(model, examples).tolist()}
        outputs = [tok.decode([t]).strip() for t in extra["token"]]
        return Predictions(outputs, extra, {"final": kept[0]} if kept else {})

    def _predicted(self, model: Any, examples: Sequence[Example],
                   last: Float[Tensor, "batch vocab"]) -> Int[Tensor, "batch"]:
        """The predicted token of each example: the best admitted answer, or the argmax."""
        candidates = self._candidates(model)
        if candidates is None:
            return last.argmax(-1)
        return torch.stack([candidates[ex.kind][row[candidates[ex.kind]].argmax()]
                            for row, ex in zip(last, examples)])

    def score_from_logits(self, model: Any, examples: Sequence[Example],
                          last_logits: Float[Tensor, "batch vocab"]) -> Optional[Float[Tensor, "batch"]]:
        """Accuracy per example from the last position's logits (what :meth:`score` reads).

        Example:
            >>> from tl_vlm import HookedVLM
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> task = toy_task(4)
            >>> batch = task.prepare(model, task.examples)
            >>> last = model.last_logits(batch)
            >>> torch.equal(task.score_from_logits(model, task.examples, last),
            ...             task.score(model, batch, task.examples))
            True
        """
        if type(self).predict is not NextTokenTask.predict or \
                type(self).evaluate is not NextTokenTask.evaluate:
            return None     # a subclass scores in its own way: through score()
        predicted = self._predicted(model, examples, last_logits.detach().float().cpu())
        return (predicted == self.answer_ids(model, examples)).float()

    def evaluate(self, examples: Sequence[Example], predictions: Predictions,
                 scoring: Scoring = Scoring()) -> Evaluation:
        _check_lengths(examples, predictions)
        tokens, answers = predictions.extra["token"], predictions.extra["answer_token"]
        scores = [float(t == a) for t, a in zip(tokens, answers)]
        names = {ex.answers[0] for ex in examples}
        details: dict[str, Any] = {
            "chance": _chance_per_kind([ex.kind for ex in examples], answers),
            "classes": len(names), "collision_rate": 1 - len(set(answers)) / len(names)}
        metrics = {}
        if "final" in predictions.tensors:
            from tl_vlm.analyses.geometry import label_overlap

            labels = [ex.klass for ex in examples]
            details["chi_out_k"] = k = overlap_k(len(labels))
            metrics["chi_out"] = label_overlap(predictions.tensors["final"].numpy(), labels, k=k)
        return Evaluation(self.metric, sum(scores) / len(scores), scores, metrics, details)

    def chance(self) -> Optional[float]:
        return _chance_per_kind([ex.kind for ex in self.examples],
                                [ex.answers[0] for ex in self.examples])

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "closed_set": self.closed_set,
                "on_collision": self.on_collision,
                "final_representation": self.final_representation}


def _check_lengths(examples: Sequence[Example], predictions: Predictions) -> None:
    if len(examples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples; "
                         f"pass one prediction per example, in order")
    if not examples:
        raise ValueError("no examples to score")


@dataclass
class GenerationTask(Task):
    """Short free-form answers: greedy generation, scored by the official VQA accuracy.

    The prompt is the paper's VQA template of the model's family (``prompt_kind="vqa"``:
    the question, then "Answer the question using a single word or phrase."). The
    continuation is decoded without special tokens and scored whole, line breaks as
    spaces (the authors' setting; :class:`Scoring` ``extract="first_line"`` keeps the
    first line), against the examples' ``references`` (VQAv2: the ten answers), or
    their ``answers`` when there are no references.

    JSONL lines: ``{"image": path, "question": str, "answers": [str, ...], "label": str}``
    (``label`` optional).

    Example (the toy model answers with one word, then ``</s>``):
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> from dataclasses import replace
        >>> examples = [replace(ex, references=ex.answers * 3)     # three annotators agree
        ...             for ex in toy_task(4).examples]
        >>> task = GenerationTask("toy", examples, max_new_tokens=3, prompt_kind=None)
        >>> said = task.predict(model, task.prepare(model, examples), examples)
        >>> said.outputs, task.evaluate(examples, said).scores
        (['red', 'square', 'top-left', 'green'], [1.0, 1.0, 1.0, 1.0])

    From a JSONL file (image paths relative to the file):

        >>> import json, pathlib, tempfile
        >>> from PIL import Image
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = pathlib.Path(tmp.name)
        >>> Image.new("RGB", (8, 8)).save(root / "black.png")
        >>> row = {"image": "black.png", "question": "What colour?", "answers": ["black"] * 3}
        >>> _ = (root / "vqa.jsonl").write_text(json.dumps(row))     # one line per example
        >>> task = GenerationTask.from_jsonl(root / "vqa.jsonl")
        >>> task.name, len(task), task.examples[0].answers, task.prompt_kind
        ('vqa', 1, ('black', 'black', 'black'), 'vqa')
        >>> tmp.cleanup()
    """

    max_new_tokens: int = 20
    prompt_kind: Optional[str] = "vqa"
    metric = "vqa_accuracy"

    @classmethod
    def from_jsonl(cls, path: Union[str, Path], limit: Optional[int] = None,
                   name: Optional[str] = None, **kwargs: Any) -> "GenerationTask":
        path = Path(path)
        examples = []
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    image = Path(row["image"])
                    question, answers = row["question"], row["answers"]
                except json.JSONDecodeError as err:
                    raise TaskDataError(f"{path}:{n}: not a JSON line ({err.msg} at column "
                                        f"{err.colno}); expected one object per line with "
                                        f"'image', 'question' and 'answers'") from None
                except (KeyError, TypeError) as err:
                    found = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise TaskDataError(f"{path}:{n}: expected a JSON object with 'image', "
                                        f"'question' and 'answers', found {found} "
                                        f"({type(err).__name__}: {err})") from None
                if not image.is_absolute():
                    image = path.parent / image
                check_image_file(image, f"{path}:{n}")
                answers = [answers] if isinstance(answers, str) else list(answers)
                examples.append(Example(question, (image,), tuple(answers), row.get("label"),
                                        row.get("kind"), id=row.get("id", n)))
                if limit is not None and len(examples) >= limit:
                    break
        if not examples:
            raise TaskDataError(f"{path} holds no examples: expected one JSON object per line "
                                f"with 'image', 'question' and 'answers'")
        return cls(name or path.stem, examples, **kwargs)

    @torch.no_grad()
    def predict(self, model: Any, batch: VLMBatch, examples: Sequence[Example],
                fwd_hooks: Hooks = ()) -> Predictions:
        out = model.generate(batch, max_new_tokens=self.max_new_tokens, fwd_hooks=fwd_hooks)
        return Predictions(list(out.text))

    def evaluate(self, examples: Sequence[Example], predictions: Predictions,
                 scoring: Scoring = Scoring()) -> Evaluation:
        from tl_vlm.eval.metrics import vqa_accuracy

        _check_lengths(examples, predictions)
        answers = [ex.references or ex.answers for ex in examples]
        said = [extract_answer(text, scoring.extract) for text in predictions.outputs]
        per_mode = {mode: [vqa_accuracy(s, a, normalise=mode) for s, a in zip(said, answers)]
                    for mode in ("always", "official")}
        scores = per_mode[scoring.vqa_normalise]
        metrics = {f"vqa_{mode}": sum(s) / len(s) for mode, s in per_mode.items()}
        return Evaluation(self.metric, sum(scores) / len(scores), scores, metrics)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "max_new_tokens": self.max_new_tokens}


@dataclass
class CaptionTask(GenerationTask):
    """Captioning: greedy generation of up to 60 tokens, scored by CIDEr-D.

    CIDEr weighs n-grams by their document frequency over the whole set, so a caption's
    score depends on the other images: only compare conditions on the same examples
    (the main job always does). :class:`Scoring` ``cider`` picks the tokenisation
    (``"raw"``: the paper's; ``ptb-approx`` is reported alongside).

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> examples = [Example(ex.prompt, references=(ex.answers[0], f"a {ex.answers[0]}"))
        ...             for ex in toy_task(6).examples]
        >>> task = CaptionTask("toy-captions", examples, max_new_tokens=2, prompt_kind=None)
        >>> said = task.predict(model, task.prepare(model, examples), examples)
        >>> result = task.evaluate(examples, said)
        >>> result.metric, round(result.value, 3), sorted(result.metrics)
        ('cider', 2.483, ['cider_ptb-approx', 'cider_raw'])
    """

    max_new_tokens: int = 60
    prompt_kind: Optional[str] = "caption"
    metric = "cider"

    def evaluate(self, examples: Sequence[Example], predictions: Predictions,
                 scoring: Scoring = Scoring()) -> Evaluation:
        from tl_vlm.eval.metrics import cider_d

        _check_lengths(examples, predictions)
        missing = [i for i, ex in enumerate(examples) if not ex.references]
        if missing:
            raise ValueError(f"examples {missing[:5]} have no reference captions; CIDEr "
                             f"needs Example.references")
        said = {i: extract_answer(text, scoring.extract)
                for i, text in enumerate(predictions.outputs)}
        refs = {i: list(ex.references) for i, ex in enumerate(examples)}
        results = {mode: cider_d(said, refs, tokenize=mode)
                   for mode in dict.fromkeys(("raw", "ptb-approx", scoring.cider))}
        chosen = results[scoring.cider]
        metrics = {f"cider_{r.tokenize}": r.corpus for r in results.values()}
        return Evaluation(self.metric, chosen.corpus, [chosen.per_image[i] for i in said],
                          metrics)


def _words(text: str) -> list[str]:
    """Lower-case words, any run of non-alphanumerics a separator ("man-eater": two)."""
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).split()


def starts_with_name(text: str, names: Sequence[str]) -> bool:
    """Whether ``text`` begins, word for word (a leading article aside), with one of
    ``names``.

    Example:
        >>> starts_with_name(" great white shark swimming", ["great white shark", "white shark"])
        True
        >>> starts_with_name("an English setter.", ["English setter"]), starts_with_name("catfish", ["cat"])
        (True, False)
    """
    said = _words(text)
    if said[:1] in (["a"], ["an"], ["the"]):
        said = said[1:]
    for name in names:
        want = _words(name)
        if want and said[:len(want)] == want:
            return True
    return False


@dataclass
class OpenClassTask(GenerationTask):
    """Open-vocabulary classification (the eval spec's ImageNet variant): greedy
    continuation of up to 5 tokens after the prompt ("... This animal is a"), correct when
    it starts, word for word, with one of the class's names (:func:`starts_with_name`; the
    names are the examples' ``references``, else their ``answers``: every lemma of an
    ImageNet label). No candidate set, so no chance level.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> task = OpenClassTask("toy-open", toy_task(4).examples, max_new_tokens=2, prompt_kind=None)
        >>> said = task.predict(model, task.prepare(model, task.examples), task.examples)
        >>> result = task.evaluate(task.examples, said)
        >>> said.outputs, result.metric, result.scores
        (['red', 'square', 'top-left', 'green'], 'name_prefix_accuracy', [1.0, 1.0, 1.0, 1.0])
    """

    max_new_tokens: int = 5
    prompt_kind: Optional[str] = "imagenet"
    metric = "name_prefix_accuracy"

    def evaluate(self, examples: Sequence[Example], predictions: Predictions,
                 scoring: Scoring = Scoring()) -> Evaluation:
        _check_lengths(examples, predictions)
        scores = [float(starts_with_name(extract_answer(text, scoring.extract),
                                         ex.references or ex.answers))
                  for text, ex in zip(predictions.outputs, examples)]
        return Evaluation(self.metric, sum(scores) / len(scores), scores)


def toy_task(n: int = 240, seed: int = 0) -> NextTokenTask:
    """The shipped toy models' task (:mod:`tl_vlm.toy.task`) as a :class:`NextTokenTask`.

    Held-out examples (the evaluation stream, never seen in training); ``seed`` picks
    another held-out set. Question types take turns and each type's answers are balanced,
    so chance is 1/4.

    Example:
        >>> task = toy_task(240)
        >>> len(task), task.chance(), task.examples[0].kind
        (240, 0.25, 'colour')
    """
    from tl_vlm.toy.task import DEFAULT_EVAL_SEED, make_examples

    data = make_examples(n, seed=DEFAULT_EVAL_SEED + seed)
    examples = [Example(ex.prompt, answers=(ex.answer,), label=ex.answer, kind=ex.question,
                        id=i) for i, ex in enumerate(data)]
    return NextTokenTask("toy", examples)
