"""Which rows a run uses, and the provenance recorded in ``run.json``."""

from __future__ import annotations

import hashlib
import random
from typing import Any, Optional, Sequence, Union
from typing import TYPE_CHECKING

from tl_vlm.eval.paper_sets import EvalSource, eval_source
from tl_vlm.eval.sources import SourceSpec, resolve_source

if TYPE_CHECKING:  # imported on first use: importing tl_vlm stays light
    import datasets


# --------------------------------------------------------------------------------------
# Selection and provenance
# --------------------------------------------------------------------------------------
def _check_count(n_rows: int, n: int) -> None:
    if n < 0 or n > n_rows:
        raise ValueError(f"cannot select {n} examples from {n_rows} rows; pass n <= {n_rows}")


def vqav2_indices(n_rows: int, n: int = 2000, seed: int = 42) -> list[int]:
    """The authors' VQAv2 selection: ``random.Random(seed).sample(range(n_rows), n)``,
    in that order (the same draw as their ``random.seed(42); random.sample(list, n)``).

    Example:
        >>> vqav2_indices(214354)[:8]
        [167621, 29184, 6556, 194393, 72097, 64196, 58513, 36579]
    """
    _check_count(n_rows, n)
    return random.Random(seed).sample(range(n_rows), n)


def select_indices(source: Union[str, EvalSource], n_rows: int, n: Optional[int] = None,
                   seed: Optional[int] = None) -> list[int]:
    """Row indices of a set's examples, in evaluation order (``n``/``seed`` default to
    the paper's).

    Example:
        >>> select_indices("coco", 5000)[:3], len(select_indices("coco", 5000))
        ([0, 1, 2], 2000)
        >>> select_indices("vqav2", 50, n=4), select_indices("imagenet", 3)
        ([40, 7, 1, 47], [0, 1, 2])
        >>> select_indices("flickr30k", 10)
        Traceback (most recent call last):
        ...
        ValueError: cannot select 2000 examples from 10 rows; pass n <= 10
    """
    source = eval_source(source)
    if source.selection == "all":
        return list(range(n_rows if n is None else min(n, n_rows)))
    n = source.n if n is None else n
    if source.selection == "first":
        _check_count(n_rows, n)
        return list(range(n))
    if source.selection == "sample":
        return vqav2_indices(n_rows, n, source.seed if seed is None else seed)
    raise ValueError(f"{source.name}: unknown selection rule {source.selection!r}")


def row_ids(ds: "datasets.Dataset", indices: Sequence[int],
            id_column: Optional[str]) -> list[Union[int, str]]:
    """The ids of the selected rows (the row index when there is no id column), read
    without decoding any image.

    Example:
        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"cocoid": [11, 22, 33]})
        >>> row_ids(ds, [2, 0], "cocoid"), row_ids(ds, [2, 0], None)
        ([33, 11], [2, 0])
    """
    if id_column is None:
        return [int(i) for i in indices]
    column = ds.select_columns([id_column])
    return [column[int(i)][id_column] for i in indices]


def selection_hash(ids: Sequence[Union[int, str]]) -> str:
    """sha1 of the ordered ids (``repr`` of each, one per line): equal hashes mean the
    same examples in the same order.

    Example:
        >>> selection_hash([1, 2]) == selection_hash([1, 2]) != selection_hash([2, 1])
        True
        >>> selection_hash([1, 2]) != selection_hash(["1", "2"])
        True
    """
    return hashlib.sha1("\n".join(repr(i) for i in ids).encode()).hexdigest()


def _hub_online() -> bool:
    import datasets
    import huggingface_hub

    return not (huggingface_hub.is_offline_mode() or datasets.config.HF_HUB_OFFLINE)


def _hub_sha(repo_id: str, revision: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """``(sha, None)`` of a hub dataset revision, or ``(None, why not)``."""
    if not _hub_online():
        return None, "offline"
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo_id, revision=revision).sha, None
    except Exception as err:  # provenance is best effort; the run itself does not need it
        return None, f"{type(err).__name__}: {err}"


def source_record(src: SourceSpec, ds: "datasets.Dataset", override: Optional[str] = None,
                  indices: Optional[Sequence[int]] = None,
                  ids: Optional[Sequence[Union[int, str]]] = None) -> dict[str, Any]:
    """What was loaded, for ``run.json``: the source, how it was resolved, the row count,
    the hub commit sha (hub sources, when online) and the selected rows.

    Example:
        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"question_id": [5, 6, 7]})
        >>> rec = source_record(SourceSpec("lmms-lab/VQAv2", "validation"), ds,
        ...                     override="/data/vqa", indices=[2, 0], ids=[7, 5])
        >>> rec["loaded_from"], rec["n_rows"], rec["sha"], rec["ids"]
        ('/data/vqa', 3, None, [7, 5])
    """
    record: dict[str, Any] = {
        "hub_id": src.hub_id, "split": src.split, "config": src.config,
        "revision": src.revision, "data_files": src.data_files, "override": override,
        "loaded_from": override if override is not None else (src.data_files or src.hub_id),
        "n_rows": len(ds), "columns": list(ds.column_names), "sha": None,
    }
    kind = None if override is not None else resolve_source(src)[0]
    if kind == "hub":
        record["sha"], record["sha_error"] = _hub_sha(src.hub_id, src.revision)
    elif kind == "hub-data-files":
        from huggingface_hub.utils import parse_hf_uri

        uri = parse_hf_uri(src.data_files)
        record["sha"], record["sha_error"] = _hub_sha(uri.id, uri.revision)
    if indices is not None:
        record["indices"] = [int(i) for i in indices]
    if ids is not None:
        record["ids"] = list(ids)
        record["selection_hash"] = selection_hash(ids)
    return record
