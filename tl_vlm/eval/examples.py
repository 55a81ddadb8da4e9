"""Examples: one question about one or more images, and images read only when needed.

The data every task is made of (:mod:`tl_vlm.eval.tasks`), what the data loaders
produce (:mod:`tl_vlm.eval.data`) and what the prompt templates render
(:mod:`tl_vlm.eval.prompts`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union


@dataclass(frozen=True)
class Example:
    """One question about one (or more) images.

    Attributes:
        prompt: the text; images go before it unless it holds the family's placeholders.
        images: PIL images, paths or :class:`LazyImage` (read when a batch needs them);
            empty when the prompt writes its image as tokens (the toy models).
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

    def to_record(self) -> dict[str, Any]:
        """What scoring needs of the example, JSON-ready (no images, no meta).

        Example:
            >>> Example("Why?", answers=("yes",), kind="yes/no", id=7).to_record()
            {'prompt': 'Why?', 'answers': ['yes'], 'label': None, 'kind': 'yes/no', 'id': 7, 'references': []}
        """
        return {"prompt": self.prompt, "answers": list(self.answers), "label": self.label,
                "kind": self.kind, "id": self.id, "references": list(self.references)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Example":
        """The inverse of :meth:`to_record` (an example without its images).

        Example:
            >>> ex = Example("Why?", answers=("yes",), references=("yes", "no"))
            >>> Example.from_record(ex.to_record()) == ex
            True
        """
        return cls(record["prompt"], (), tuple(record["answers"]), record["label"],
                   record["kind"], record["id"], tuple(record["references"]))


class LazyImage(abc.ABC):
    """An image that is read only when a batch needs it: a dataset of 10k photos does
    not fit in memory decoded, so examples hold these and :meth:`Task.prepare` loads them.

    Example:
        >>> from PIL import Image
        >>> class Grey(LazyImage):
        ...     def load(self):
        ...         return Image.new("RGB", (4, 4), "grey")
        >>> load_image(Grey()).getpixel((0, 0))
        (128, 128, 128)
    """

    @abc.abstractmethod
    def load(self) -> Any:
        """The image as an RGB PIL image."""


class TaskDataError(ValueError):
    """A task's data is not what it must be (an empty file, a malformed line, a line
    without its keys, an image that is not one): said with the file, the line and what
    to fix, before any model is loaded.

    Example:
        >>> check_image_file(Path("/no/such.png"), "tasks.jsonl:3")
        Traceback (most recent call last):
        ...
        tl_vlm.eval.examples.MissingImageError: tasks.jsonl:3: image /no/such.png does not exist
    """


class MissingImageError(TaskDataError, FileNotFoundError):
    """A task's image file does not exist (a :class:`TaskDataError` and a
    ``FileNotFoundError``).

    Example:
        >>> issubclass(MissingImageError, FileNotFoundError)
        True
    """


def check_image_file(path: Path, where: str) -> None:
    """That ``path`` is an image PIL can read (its header: no pixels decoded), else a
    :class:`TaskDataError` naming ``where`` (e.g. ``"file.jsonl:3"``).

    Example:
        >>> import tempfile
        >>> bad = Path(tempfile.mkdtemp()) / "a.png"
        >>> _ = bad.write_text("not a png")
        >>> check_image_file(bad, "tasks.jsonl:1")               # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        tl_vlm.eval.examples.TaskDataError: tasks.jsonl:1: image .../a.png is not a readable image (cannot identify image file ...); replace the file or remove the line
    """
    from PIL import Image

    if not path.exists():
        raise MissingImageError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise TaskDataError(f"{where}: image {path} is not a readable image ({detail}); "
                            f"replace the file or remove the line") from None


def load_image(image: Any) -> Any:
    """A PIL image from a PIL image, a path or a :class:`LazyImage`.

    Example:
        >>> from PIL import Image
        >>> im = Image.new("RGB", (2, 2))
        >>> load_image(im) is im
        True
    """
    if isinstance(image, LazyImage):
        return image.load()
    if isinstance(image, (str, Path)):
        from PIL import Image

        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:   # PIL's errors for a bad file
            if not Path(image).exists():
                raise
            raise TaskDataError(f"image {image} is not a readable image "
                                f"({' '.join(str(err).split())})") from None
    return image
