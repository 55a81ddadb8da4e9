"""The paper's evaluation sets: where each is, which split and rows, which columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union
from typing import TYPE_CHECKING

from tl_vlm.eval.sources import SourceSpec

if TYPE_CHECKING:  # imported on first use: importing tl_vlm stays light
    import datasets


# --------------------------------------------------------------------------------------
# The paper's datasets
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSource:
    """One of the paper's evaluation sets: where it is, which rows, which columns.

    Attributes:
        name: short name (``"vqav2"``).
        task: ``"vqa"``, ``"caption"`` or ``"imagenet"`` (the prompt and scoring kind).
        spec: where the rows come from.
        selection: ``"sample"`` (``random.Random(seed).sample``), ``"first"`` (the first
            ``n`` rows) or ``"all"``.
        n, seed: the paper's number of examples and seed (None where unused).
        id_column: the column giving each example's id (None: the row index).
        columns: the columns read (checked on load).
        notes: caveats worth carrying into a report.

    Example:
        >>> src = SOURCES["vqav2"]
        >>> src.task, src.spec.hub_id, src.selection, src.n, src.seed, src.id_column
        ('vqa', 'lmms-lab/VQAv2', 'sample', 2000, 42, 'question_id')
    """

    name: str
    task: str
    spec: SourceSpec
    selection: str
    n: Optional[int]
    seed: Optional[int]
    id_column: Optional[str]
    columns: tuple[str, ...]
    notes: str = ""

    def check_columns(self, ds: "datasets.Dataset") -> None:
        """A clear error when the loaded rows lack a column this set reads."""
        missing = [c for c in self.columns if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"{self.name}: the loaded rows lack column(s) {missing} (found "
                f"{ds.column_names}); expected the schema of {self.spec.describe()}. "
                f"Is the override the right dataset and split?")


_IMAGENET_COLUMNS = ("image", "text", "label", "root_label", "synset", "offset")
_IMAGENET_SPEC = SourceSpec("RitAreaSciencePark/imagenet_short_text_100_classes_x_100_samples",
                            "train")

SOURCES: dict[str, EvalSource] = {s.name: s for s in (
    EvalSource(
        "vqav2", "vqa", SourceSpec("lmms-lab/VQAv2", "validation"), "sample", 2000, 42,
        "question_id",
        ("image", "question", "question_id", "answers", "multiple_choice_answer",
         "question_type", "answer_type", "image_id"),
        notes="The paper loaded HuggingFaceM4/VQAv2 (a script); the seed-42 indices pick "
              "the same questions only if lmms-lab/VQAv2 keeps the script's row order "
              "(unverified: compare question_ids on a host with hub access)."),
    EvalSource(
        "flickr30k", "caption",
        SourceSpec("nlphuji/flickr30k", "test",
                   data_files="hf://datasets/nlphuji/flickr30k@refs/convert/parquet/"
                              "TEST/test/*.parquet"),
        "first", 2000, None, "img_id",
        ("image", "caption", "img_id", "sentids", "split", "filename"),
        notes="All Karpathy splits are mixed in 'test'; the split column is ignored, as "
              "in the authors' code."),
    EvalSource(
        "coco", "caption", SourceSpec("yerevann/coco-karpathy", "test"), "first", 2000,
        None, "cocoid",
        ("url", "sentences", "cocoid", "imgid", "filename", "filepath", "sentids", "split"),
        notes="Rows hold COCO val2014 URLs, not images (ImageResolver)."),
    EvalSource(
        "imagenet", "imagenet", _IMAGENET_SPEC, "all", None, None, None, _IMAGENET_COLUMNS,
        notes="100 classes x 100 images; the id is the row index."),
    EvalSource(
        "imagenet_open", "imagenet", _IMAGENET_SPEC, "all", None, None, None, _IMAGENET_COLUMNS,
        notes="The ImageNet rows, scored open-vocabulary: greedy 5 tokens, correct when "
              "the continuation starts with one of the label's lemmas."),
    EvalSource(
        "steering", "imagenet",
        SourceSpec("RitAreaSciencePark/counterfactual_dataset_20_classes_x_100_samples",
                   "train"),
        "all", None, None, None, _IMAGENET_COLUMNS,
        notes="Hub id unverified. Sorted root_labels are paired (base, target) in turn "
              "(steering_pairs)."),
)}


def eval_source(name: Union[str, EvalSource]) -> EvalSource:
    """The registered source called ``name`` (or ``name`` itself if already a source).

    Example:
        >>> eval_source("coco").spec.hub_id
        'yerevann/coco-karpathy'
        >>> eval_source("gqa")
        Traceback (most recent call last):
        ...
        KeyError: "unknown evaluation set 'gqa'; known: coco, flickr30k, imagenet, imagenet_open, steering, vqav2"
    """
    if isinstance(name, EvalSource):
        return name
    if name not in SOURCES:
        raise KeyError(f"unknown evaluation set {name!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]
