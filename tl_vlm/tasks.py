"""Image-understanding tasks that the main job scores a model on.

A :class:`Task` is a list of :class:`Example` (a prompt, its images, the accepted
answers and a class label) plus a rule for scoring a batch. Two rules cover the
paper's tasks:

- :class:`NextTokenTask`: the answer is one token; an example is right when the
  greedy next token is the answer's first token (ImageNet-style prompt completion,
  the toy models' one-token answers).
- :class:`GenerationTask`: greedy generation of up to ``max_new_tokens`` tokens
  scored with the VQA accuracy ``min(1, matches / 3)`` against the annotators'
  answers after VQA-style normalisation (VQAv2, short-answer questions).

Example:
    >>> from tl_vlm import HookedVLM
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> task = toy_task(24)                                 # a NextTokenTask
    >>> for start, examples in task.batches(12):
    ...     batch = task.prepare(model, examples)
    ...     scores = task.score(model, batch, examples)     # [batch] in [0, 1]
    ...     print(start, scores.mean().item())
    0 1.0
    12 1.0

    VQAv2 on a real checkpoint (a JSONL file of questions about image files):

    >>> model = HookedVLM.from_pretrained("facebook/chameleon-7b")    # doctest: +SKIP
    >>> task = GenerationTask.from_jsonl("vqa.jsonl", limit=1000)    # doctest: +SKIP
"""

from __future__ import annotations

import abc
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_vlm.answers import answer_token_id, answer_token_ids  # noqa: F401  (re-exported)
from tl_vlm.batch import VLMBatch

Hooks = Sequence[tuple[Union[str, Callable], Callable]]


@dataclass(frozen=True)
class Example:
    """One question about one (or more) images.

    Attributes:
        prompt: the text; images go before it unless it holds the family's placeholders.
        images: PIL images or paths (loaded lazily); empty when the prompt writes its
            image as tokens (the toy models).
        answers: accepted answers (VQA: the ten annotators' answers).
        label: the class the image shows (pairs source and target images for patching);
            defaults to the first answer.
        kind: the question type (e.g. ``"colour"``); examples of one kind share their
            set of possible answers, which sets the chance level.
        id: the example's id in its dataset (VQAv2 ``question_id``, Flickr30k
            ``img_id``, COCO ``cocoid``, ImageNet row index); None for ad-hoc examples.
        references: what a metric compares the output with: all ten VQA answers in
            annotator order (duplicates kept), or a caption's reference captions.
        meta: further dataset fields worth keeping with a prediction (not compared by
            hash; equal examples still compare their meta).

    Example:
        >>> ex = Example("How many dogs?", images=("dogs.jpg",), answers=("2", "two", "2"))
        >>> ex.klass, Example("Which colour?", answers=("red",), label="warm").klass
        ('2', 'warm')
        >>> ex = Example("What is it?", answers=("cat",), id=42, references=("cat", "cat"),
        ...              meta={"answer_type": "other"})
        >>> ex.id, ex.references, ex.meta["answer_type"]
        (42, ('cat', 'cat'), 'other')
    """

    prompt: str
    images: tuple = ()
    answers: tuple[str, ...] = ()
    label: Optional[str] = None
    kind: Optional[str] = None
    id: Optional[Union[int, str]] = None
    references: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def klass(self) -> str:
        return self.label if self.label is not None else self.answers[0]


def _load_image(image: Any) -> Any:
    if isinstance(image, (str, Path)):
        from PIL import Image

        return Image.open(image).convert("RGB")
    return image


@dataclass
class Task(abc.ABC):
    """A named list of examples with a scoring rule (see the subclasses).

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
        >>> Task("toy", task.examples)           # a task needs a scoring rule
        Traceback (most recent call last):
        ...
        TypeError: Can't instantiate abstract class Task with abstract method score
    """

    name: str
    examples: list[Example]
    padding_side: str = "left"

    def __len__(self) -> int:
        return len(self.examples)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[int, list[Example]]]:
        """``(index of the first example, examples)`` chunks, from ``start`` on."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for i in range(start, len(self.examples), batch_size):
            yield i, self.examples[i:i + batch_size]

    def prepare(self, model: Any, examples: Sequence[Example]) -> VLMBatch:
        images = [[_load_image(im) for im in ex.images] or None for ex in examples]
        if all(im is None for im in images):
            images = None
        return model.prepare([ex.prompt for ex in examples], images=images,
                             padding_side=self.padding_side)

    @abc.abstractmethod
    def score(self, model: Any, batch: VLMBatch, examples: Sequence[Example],
              fwd_hooks: Hooks = ()) -> Float[Tensor, "batch"]:
        """Per-example scores in [0, 1] with ``fwd_hooks`` active."""

    def chance(self) -> Optional[float]:
        """Expected score of a guess that ignores the image (None when unknown)."""
        return None


@dataclass
class NextTokenTask(Task):
    """One-token answers, read off the greedy next token at the last position.

    With ``closed_set`` (the default) and every example's ``kind`` known, the prediction
    is the best of the answers its kind admits (the paper's classification by prompt
    completion over the class names), so a blind guess scores exactly ``chance()``;
    otherwise it is the argmax over the whole vocabulary.

    ``chance`` is the mean over examples of 1 / (number of distinct answers among the
    examples of the same ``kind``): a uniform guess among the answers its question
    admits, which is all a model that cannot see the image can do on a balanced task.

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
        >>> blind = task.score(model, batch, task.examples, fwd_hooks=gate_knockout(model, batch))
        >>> bool(blind.mean() < 0.6)                                 # near chance without the gate
        True
    """

    closed_set: bool = True
    on_collision: str = "error"

    def answer_ids(self, model: Any, examples: Sequence[Example]) -> Int[Tensor, "batch"]:
        """The token of each example's first answer (:func:`tl_vlm.answers.answer_token_id`)."""
        return answer_token_ids(model.layout.tokenizer, [ex.answers[0] for ex in examples])

    def _candidates(self, model: Any) -> Optional[dict[str, Tensor]]:
        """Answer token ids admitted by each question kind (None: open vocabulary).

        Two answers of one kind that share a first token are an error (the closed set
        could not tell them apart), unless ``on_collision="merge"``.
        """
        if not self.closed_set or any(ex.kind is None for ex in self.examples):
            return None
        tok = model.layout.tokenizer
        answers: dict[str, set] = {}     # distinct answers only: this runs on every batch
        for ex in self.examples:
            answers.setdefault(ex.kind, set()).add(ex.answers[0])
        return {kind: answer_token_ids(tok, sorted(v), closed_set=True,
                                       on_collision=self.on_collision).unique()
                for kind, v in answers.items()}

    @torch.no_grad()
    def score(self, model: Any, batch: VLMBatch, examples: Sequence[Example],
              fwd_hooks: Hooks = ()) -> Float[Tensor, "batch"]:
        last = model.last_logits(batch, fwd_hooks=fwd_hooks).float().cpu()   # [batch, vocab]
        candidates = self._candidates(model)
        if candidates is None:
            predicted = last.argmax(-1)
        else:
            predicted = torch.stack([
                candidates[ex.kind][row[candidates[ex.kind]].argmax()]
                for row, ex in zip(last, examples)])
        return (predicted == self.answer_ids(model, examples)).float()

    def chance(self) -> Optional[float]:
        if any(ex.kind is None for ex in self.examples):
            return None
        answers_of_kind: dict[str, set] = {}
        for ex in self.examples:
            answers_of_kind.setdefault(ex.kind, set()).add(ex.answers[0])
        return sum(1 / len(answers_of_kind[ex.kind]) for ex in self.examples) / len(self.examples)


@dataclass
class GenerationTask(Task):
    """Free-form short answers, scored by VQA accuracy ``min(1, matches / 3)``.

    JSONL lines: ``{"image": path, "question": str, "answers": [str, ...], "label": str}``
    (``label`` optional). The paper's VQAv2 instruction is appended to every question.

    Example (the toy model answers with one word, then ``</s>``):
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> task = GenerationTask("toy", toy_task(4).examples, max_new_tokens=3, instruction="")
        >>> batch = task.prepare(model, task.examples)
        >>> task.score(model, batch, task.examples)
        tensor([1., 1., 1., 1.])

    From a JSONL file (image paths relative to the file):
        >>> import json, pathlib, tempfile
        >>> from PIL import Image
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = pathlib.Path(tmp.name)
        >>> Image.new("RGB", (8, 8)).save(root / "black.png")
        >>> row = {"image": "black.png", "question": "What colour?", "answers": ["black"] * 3}
        >>> _ = (root / "vqa.jsonl").write_text(json.dumps(row))     # one line per example
        >>> task = GenerationTask.from_jsonl(root / "vqa.jsonl")
        >>> task.name, len(task), task.examples[0].answers
        ('vqa', 1, ('black', 'black', 'black'))
        >>> tmp.cleanup()
    """

    max_new_tokens: int = 20
    instruction: str = "Answer the question using a single word or phrase."

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
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"{path}:{n}: expected a JSON object with 'image', 'question' and "
                        f"'answers' ({err})"
                    ) from err
                if not image.is_absolute():
                    image = path.parent / image
                if not image.exists():
                    raise FileNotFoundError(f"{path}:{n}: image {image} does not exist")
                answers = [answers] if isinstance(answers, str) else list(answers)
                examples.append(Example(question, (image,), tuple(answers), row.get("label"),
                                        row.get("kind")))
                if limit is not None and len(examples) >= limit:
                    break
        if not examples:
            raise ValueError(f"{path} holds no examples")
        return cls(name or path.stem, examples, **kwargs)

    def prepare(self, model: Any, examples: Sequence[Example]) -> VLMBatch:
        asked = [replace(ex, prompt=f"{ex.prompt} {self.instruction}") for ex in examples]
        return super().prepare(model, asked)

    @torch.no_grad()
    def score(self, model: Any, batch: VLMBatch, examples: Sequence[Example],
              fwd_hooks: Hooks = ()) -> Float[Tensor, "batch"]:
        out = model.generate(batch, max_new_tokens=self.max_new_tokens, fwd_hooks=fwd_hooks)
        return torch.tensor([vqa_accuracy(text, ex.answers)
                             for text, ex in zip(out.text, examples)])


# VQA answer normalisation (the official evaluation's rules, abridged: lower case,
# punctuation, articles, number words).
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


def normalise_answer(text: str) -> str:
    """VQA-style normalisation: lower case, no punctuation or articles, digits for numbers.

    Example:
        >>> normalise_answer("Two dogs."), normalise_answer("The 1,000 cats!")
        ('2 dogs', '1000 cats')
    """
    text = text.strip().lower().split("\n")[0]
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"[^\w\s']", " ", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """``min(1, #annotators who gave the prediction / 3)``; one reference: exact match.

    Example:
        >>> answers = ["2", "2", "two", "3", "2 dogs"]
        >>> vqa_accuracy("Two.", answers), round(vqa_accuracy("3", answers), 3)
        (1.0, 0.333)
        >>> vqa_accuracy("the cat", ["cat"])
        1.0
    """
    pred = normalise_answer(prediction)
    matches = sum(normalise_answer(a) == pred for a in answers)
    return min(1.0, matches / 3) if len(answers) >= 3 else float(matches > 0)


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
    examples = [Example(ex.prompt, answers=(ex.answer,), label=ex.answer, kind=ex.question)
                for ex in data]
    return NextTokenTask("toy", examples)
