"""Rows -> Examples: the ImageNet class names, the steering pairs, and the selection a
run opens (:func:`open_eval_set`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union
from typing import TYPE_CHECKING

from tl_vlm.eval.examples import Example
from tl_vlm.eval.images import ImageResolver, RowImage, UrlImage
from tl_vlm.eval.paper_sets import EvalSource, eval_source
from tl_vlm.eval.prompts import CAPTION_INSTRUCTION
from tl_vlm.eval.selection import row_ids, select_indices, source_record
from tl_vlm.eval.sources import load_rows

if TYPE_CHECKING:  # imported on first use: importing tl_vlm stays light
    import datasets


# --------------------------------------------------------------------------------------
# Rows -> Examples
# --------------------------------------------------------------------------------------
def imagenet_class_name(label: Any, synset: Optional[str] = None,
                        names: Optional[Sequence[str]] = None) -> str:
    """The class name used as the answer: the first lemma of ``label``, ``_`` -> space.

    ``label`` is a lemma list (``"great_white_shark, white_shark"``) or, with a
    ``ClassLabel`` column, an index into its ``names``. An integer label without names
    falls back to the ``synset`` name (``"tiger_shark.n.01"`` -> ``"tiger shark"``).

    Example:
        >>> imagenet_class_name("great_white_shark, white_shark, man-eater")
        'great white shark'
        >>> imagenet_class_name(1, names=["tench, Tinca tinca", "goldfish"])
        'goldfish'
        >>> imagenet_class_name(3, synset="tiger_shark.n.01")
        'tiger shark'
    """
    return imagenet_class_names(label, synset, names)[0]


def imagenet_class_names(label: Any, synset: Optional[str] = None,
                         names: Optional[Sequence[str]] = None) -> tuple[str, ...]:
    """Every lemma of ``label`` as a name (``_`` -> space), the first one first: what an
    open-vocabulary answer may start with (``label``, ``synset``, ``names``: as for
    :func:`imagenet_class_name`, whose answer is the first of these).

    Example:
        >>> imagenet_class_names("great_white_shark, white_shark, man-eater")
        ('great white shark', 'white shark', 'man-eater')
        >>> imagenet_class_names(3, synset="tiger_shark.n.01")
        ('tiger shark',)
        >>> imagenet_class_names(" , shark")
        Traceback (most recent call last):
        ...
        ValueError: ImageNet label ' , shark' holds no lemma
    """
    if isinstance(label, (list, tuple)):
        label = label[0] if label else ""
    if not isinstance(label, str) and names is not None:
        label = names[int(label)]
    if not isinstance(label, str):
        if not synset:
            raise ValueError(f"cannot name ImageNet class {label!r}: expected a lemma "
                             f"string label, a ClassLabel column or a synset name")
        label = synset.split(".")[0]
    lemmas = [part.replace("_", " ").strip() for part in label.split(",")]
    if not lemmas[0]:
        raise ValueError(f"ImageNet label {label!r} holds no lemma")
    return tuple(dict.fromkeys(lemma for lemma in lemmas if lemma))


def steering_pairs(root_labels: Sequence[str]) -> list[tuple[str, str]]:
    """The authors' counterfactual pairs: distinct root labels, sorted, paired in turn
    (base, target).

    Example:
        >>> steering_pairs(["dog.n.01", "cat.n.01", "fish.n.01", "bird.n.01", "cat.n.01"])
        [('bird.n.01', 'cat.n.01'), ('dog.n.01', 'fish.n.01')]
    """
    labels = sorted(set(root_labels))
    if len(labels) % 2:
        raise ValueError(f"pairing needs an even number of root labels, got {len(labels)}: "
                         f"{labels}")
    return [(labels[i], labels[i + 1]) for i in range(0, len(labels), 2)]


def _vqa_example(row: Mapping[str, Any], index: int) -> Example:
    answers = tuple(a["answer"] for a in row["answers"])
    meta = {k: row[k] for k in ("question_type", "answer_type", "image_id",
                                "multiple_choice_answer")}
    return Example(row["question"], (row["image"],), answers,
                   label=row["multiple_choice_answer"], kind=row["answer_type"],
                   id=row["question_id"], references=answers, meta={"row": index, **meta})


def _flickr_example(row: Mapping[str, Any], index: int) -> Example:
    captions = tuple(row["caption"])
    return Example(CAPTION_INSTRUCTION, (row["image"],), captions, id=row["img_id"],
                   references=captions, meta={"row": index, "filename": row["filename"]})


def _coco_example(row: Mapping[str, Any], index: int, resolver: ImageResolver,
                  lazy: bool = False) -> Example:
    captions = tuple(row["sentences"])
    meta = {"row": index, "imgid": row["imgid"], "url": row["url"], "filename": row["filename"]}
    image = UrlImage(resolver, row) if lazy else resolver.resolve_row(row)
    return Example(CAPTION_INSTRUCTION, (image,), captions,
                   id=row["cocoid"], references=captions, meta=meta)


def _imagenet_example(row: Mapping[str, Any], index: int, kind: str,
                      names: Optional[Sequence[str]]) -> Example:
    all_names = imagenet_class_names(row["label"], row.get("synset"), names)
    meta = {"row": index, **{k: row[k] for k in ("label", "root_label", "synset", "offset")}}
    # answers: the class name (closed set); references: every lemma (open vocabulary)
    return Example(row["text"], (row["image"],), all_names[:1], label=row["root_label"],
                   kind=kind, id=index, references=all_names, meta=meta)


def to_examples(source: Union[str, EvalSource], ds: "datasets.Dataset",
                indices: Optional[Sequence[int]] = None,
                resolver: Optional[ImageResolver] = None,
                lazy_images: bool = False) -> list[Example]:
    """Examples of the rows at ``indices`` (all rows by default), in that order.

    The prompt is the row's own text (VQA: the question; captions: the paper's caption
    instruction; ImageNet: the row's ``text``); :mod:`tl_vlm.eval.prompts` wraps it in a
    family's template. VQA keeps all ten answers in annotator order as ``references``
    (and ``answers``), ``label`` = ``multiple_choice_answer``, ``kind`` = ``answer_type``.
    Captions keep their reference captions. ImageNet answers with the class name (first
    lemma of ``label``) and labels with ``root_label`` (the patching pairs' class), all
    rows of one ``kind`` so that a closed-set task compares every class.

    With ``lazy_images`` no image is read now: examples hold :class:`RowImage` (or, for
    COCO, :class:`UrlImage`) references that a batch loads when it needs them (10k
    decoded photos take several GB).

    Example:
        >>> from datasets import Dataset
        >>> from PIL import Image
        >>> ds = Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 2,
        ...     "text": ["This animal is a"] * 2, "label": ["tench, Tinca tinca", "goldfish"],
        ...     "root_label": ["fish.n.01"] * 2, "synset": ["tench.n.01", "goldfish.n.01"],
        ...     "offset": ["n01440764", "n01443537"]})
        >>> ex = to_examples("imagenet", ds, [1])[0]
        >>> ex.prompt, ex.answers, ex.klass, ex.id, ex.kind
        ('This animal is a', ('goldfish',), 'fish.n.01', 1, 'imagenet')
    """
    source = eval_source(source)
    source.check_columns(ds)
    indices = range(len(ds)) if indices is None else indices
    if source.name == "coco":
        resolver = resolver or ImageResolver()
    names = getattr(ds.features.get("label"), "names", None)
    lazy = lazy_images and "image" in ds.column_names
    text_rows = ds.remove_columns(["image"]) if lazy else ds   # reading them decodes nothing
    out = []
    for i in indices:
        row = text_rows[int(i)]
        if lazy:
            row["image"] = RowImage(ds, int(i))
        if source.task == "vqa":
            out.append(_vqa_example(row, int(i)))
        elif source.name == "coco":
            out.append(_coco_example(row, int(i), resolver, lazy=lazy_images))
        elif source.task == "caption":
            out.append(_flickr_example(row, int(i)))
        else:
            out.append(_imagenet_example(row, int(i), source.name, names))
    return out


@dataclass
class EvalSelection:
    """A loaded evaluation set with its selected rows (see :func:`open_eval_set`).

    Attributes:
        source: the registered set.
        rows: every row of the split (images decode only when a row is read).
        indices: selected row indices, in evaluation order.
        ids: the selected examples' ids, same order.
        record: :func:`source_record` of the load and selection, for ``run.json``.

    Example:
        >>> import tempfile
        >>> from datasets import Dataset
        >>> from PIL import Image
        >>> tmp = tempfile.TemporaryDirectory()
        >>> _ = Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 3,
        ...     "caption": [["a dog", "a pup"]] * 3, "img_id": ["10", "11", "12"],
        ...     "sentids": [["0", "1"]] * 3, "split": ["test"] * 3,
        ...     "filename": ["a.jpg", "b.jpg", "c.jpg"]}).to_parquet(
        ...     f"{tmp.name}/data/test-00000-of-00001.parquet")
        >>> sel = open_eval_set("flickr30k", override=tmp.name, n=2)
        >>> sel.ids, [ex.references for ex in sel.examples()]
        (['10', '11'], [('a dog', 'a pup'), ('a dog', 'a pup')])
        >>> [ex.id for ex in sel.examples([1])]                    # a shard's share
        ['11']
        >>> tmp.cleanup()
    """

    source: EvalSource
    rows: "datasets.Dataset"
    indices: list[int]
    ids: list[Union[int, str]]
    record: dict[str, Any] = field(repr=False)

    def examples(self, positions: Optional[Sequence[int]] = None,
                 resolver: Optional[ImageResolver] = None,
                 lazy_images: bool = False) -> list[Example]:
        """Examples at ``positions`` of the selection (all by default)."""
        chosen = self.indices if positions is None else [self.indices[p] for p in positions]
        return to_examples(self.source, self.rows, chosen, resolver, lazy_images)


def open_eval_set(name: Union[str, EvalSource], override: Optional[str] = None,
                  n: Optional[int] = None, seed: Optional[int] = None) -> EvalSelection:
    """Load a registered set, check its columns and select the paper's rows.

    Example:
        >>> import tempfile
        >>> from datasets import Dataset
        >>> tmp = tempfile.TemporaryDirectory()
        >>> _ = Dataset.from_dict({"question": ["q"] * 5}).to_parquet(
        ...     f"{tmp.name}/data/validation-00000-of-00001.parquet")
        >>> open_eval_set("vqav2", override=tmp.name, n=2)
        Traceback (most recent call last):
        ...
        ValueError: vqav2: the loaded rows lack column(s) ['image', 'question_id', 'answers', 'multiple_choice_answer', 'question_type', 'answer_type', 'image_id'] (found ['question']); expected the schema of lmms-lab/VQAv2 [validation]. Is the override the right dataset and split?
        >>> tmp.cleanup()
    """
    source = eval_source(name)
    rows = load_rows(source.spec, override)
    source.check_columns(rows)
    indices = select_indices(source, len(rows), n, seed)
    ids = row_ids(rows, indices, source.id_column)
    record = source_record(source.spec, rows, override, indices, ids)
    record["eval_set"] = source.name
    return EvalSelection(source, rows, indices, ids, record)
