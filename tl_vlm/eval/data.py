"""The paper's evaluation datasets, loaded through ``datasets``, and turned into Examples.

This module gathers the public names of :mod:`~tl_vlm.eval.sources` (one loader),
:mod:`~tl_vlm.eval.paper_sets` (the sets), :mod:`~tl_vlm.eval.selection` (rows and
provenance), :mod:`~tl_vlm.eval.images` (lazy and URL images) and
:mod:`~tl_vlm.eval.rows` (rows -> Examples).

One entry point loads rows, whatever the source: :func:`load_rows` takes a
:class:`SourceSpec` (a hub id with split, revision, config or parquet ``data_files``)
and an optional ``override`` (a local directory or parquet glob, for tests and offline
GPU hosts), so a test and a hub run go through the same call. ``trust_remote_code`` is
never passed: ``datasets`` >= 4 refuses loading scripts, and a script-based source gets
an error naming the parquet source to use instead.

:data:`SOURCES` lists the paper's datasets (VQAv2, Flickr30k, COCO Karpathy test,
ImageNet 100 x 100 and the counterfactual steering set) with their split, selection rule
and the columns read. :func:`select_indices` applies the rule (VQAv2: the authors'
``random.Random(42).sample``; captions: the first N rows; ImageNet: every row),
:func:`source_record` describes what was loaded for ``run.json`` and
:func:`to_examples` turns rows into :class:`~tl_vlm.eval.examples.Example` objects. COCO
Karpathy rows hold image URLs, which :class:`ImageResolver` turns into local files (a
COCO root, a shared content cache, ``file://`` URLs, then HTTP).

Example:
    >>> import tempfile
    >>> from datasets import Dataset
    >>> tmp = tempfile.TemporaryDirectory()
    >>> rows = Dataset.from_dict({"question": ["What?", "Who?"], "question_id": [7, 9]})
    >>> _ = rows.to_parquet(f"{tmp.name}/data/validation-00000-of-00001.parquet")
    >>> ds = load_rows(SourceSpec("lmms-lab/VQAv2", "validation"), override=tmp.name)
    >>> len(ds), ds[1]["question_id"]
    (2, 9)
    >>> tmp.cleanup()

    The paper's sets on a host with hub access (VQAv2: 2000 questions drawn with seed 42):

    >>> selection = open_eval_set("vqav2")                            # doctest: +SKIP
    >>> examples = selection.examples()                               # doctest: +SKIP
    >>> selection.record["selection_hash"]                            # doctest: +SKIP
"""

from __future__ import annotations

from tl_vlm.eval.sources import (  # noqa: F401
    SourceSpec, ScriptDatasetError, PARQUET_ALTERNATIVES, resolve_source, load_rows)
from tl_vlm.eval.paper_sets import (  # noqa: F401
    EvalSource, SOURCES, eval_source)
from tl_vlm.eval.selection import (  # noqa: F401
    vqav2_indices, select_indices, row_ids, selection_hash, source_record)
from tl_vlm.eval.images import (  # noqa: F401
    ImageFetchError, default_image_cache, ImageResolver, RowImage, UrlImage)
from tl_vlm.eval.rows import (  # noqa: F401
    imagenet_class_name, imagenet_class_names, steering_pairs, to_examples, EvalSelection, open_eval_set)

__all__ = ['EvalSelection', 'EvalSource', 'ImageFetchError', 'ImageResolver', 'PARQUET_ALTERNATIVES', 'RowImage', 'SOURCES', 'ScriptDatasetError', 'SourceSpec', 'UrlImage', 'default_image_cache', 'eval_source', 'imagenet_class_name', 'imagenet_class_names', 'load_rows', 'open_eval_set', 'resolve_source', 'row_ids', 'select_indices', 'selection_hash', 'source_record', 'steering_pairs', 'to_examples', 'vqav2_indices']
