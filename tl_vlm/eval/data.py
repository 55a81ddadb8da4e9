"""The paper's evaluation datasets, loaded through ``datasets``, and turned into Examples.

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

import glob
import hashlib
import io
import os
import random
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

from tl_vlm.eval.prompts import CAPTION_INSTRUCTION
from tl_vlm.eval.examples import Example, LazyImage

if TYPE_CHECKING:  # datasets is imported on first use: importing tl_vlm stays light
    import datasets
    from PIL import Image as PILImage


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceSpec:
    """Where a dataset's rows come from.

    Attributes:
        hub_id: a hub dataset id (``"lmms-lab/VQAv2"``), or a local directory / parquet
            file or glob (loaded by the same call as a hub id).
        split: the split to load.
        revision: a commit sha, branch or ``"refs/convert/parquet"`` (hub only).
        data_files: an ``hf://`` glob of parquet files, for a repository whose default
            loading path is a script (the hub's parquet conversion of it).
        config: the hub configuration name, if the dataset has several.

    Example:
        >>> SourceSpec("lmms-lab/VQAv2", "validation").describe()
        'lmms-lab/VQAv2 [validation]'
        >>> SOURCES["flickr30k"].spec.describe()
        'hf://datasets/nlphuji/flickr30k@refs/convert/parquet/TEST/test/*.parquet [test]'
    """

    hub_id: str
    split: str
    revision: Optional[str] = None
    data_files: Optional[str] = None
    config: Optional[str] = None

    def describe(self) -> str:
        where = self.data_files or self.hub_id
        if self.config and not self.data_files:
            where += f" ({self.config})"
        if self.revision and not self.data_files:
            where += f"@{self.revision}"
        return f"{where} [{self.split}]"


class ScriptDatasetError(RuntimeError):
    """The source is a dataset loading script, which ``datasets`` >= 4 cannot run.

    Example:
        >>> import pathlib, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> repo = pathlib.Path(tmp.name) / "VQAv2"
        >>> repo.mkdir()
        >>> _ = (repo / "VQAv2.py").write_text("import datasets")   # a loading script
        >>> try:
        ...     load_rows(SourceSpec("HuggingFaceM4/VQAv2", "validation"), override=str(repo))
        ... except ScriptDatasetError as err:
        ...     print(str(err).split("instead, ")[-1])
        use SourceSpec("lmms-lab/VQAv2", "validation") (same features)
        >>> tmp.cleanup()
    """


# Parquet sources for script-based repositories (the paper loaded these two by script).
PARQUET_ALTERNATIVES = {
    "HuggingFaceM4/VQAv2": 'SourceSpec("lmms-lab/VQAv2", "validation") (same features)',
    "nlphuji/flickr30k": ('SourceSpec("nlphuji/flickr30k", "test", data_files='
                          '"hf://datasets/nlphuji/flickr30k@refs/convert/parquet/TEST/test/'
                          '*.parquet")'),
}


def _parquet_hint(hub_id: str, split: str, config: Optional[str]) -> str:
    for name, alternative in PARQUET_ALTERNATIVES.items():
        if hub_id.rstrip("/").lower().endswith(name.lower()):
            return f"use {alternative}"
    cfg = config or "default"
    return (f"use SourceSpec({hub_id!r}, {split!r}, data_files="
            f"'hf://datasets/{hub_id}@refs/convert/parquet/{cfg}/{split}/*.parquet') if "
            f"the hub has converted it to parquet, or export the rows to "
            f"<dir>/data/{split}-00000-of-00001.parquet and pass that directory as override")


def _local_target(path: str) -> Optional[tuple[str, str]]:
    """``("dir" | "parquet", path)`` when ``path`` names local data, else None."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return "dir", expanded
    if os.path.isfile(expanded):
        return "parquet", expanded
    if glob.has_magic(expanded) and not expanded.startswith("hf://"):
        if not glob.glob(expanded):
            raise FileNotFoundError(f"no file matches the parquet glob {path!r}")
        return "parquet", expanded
    return None


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~")) or name.endswith(".parquet")
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def resolve_source(src: SourceSpec, override: Optional[str] = None) -> tuple[str, str]:
    """How :func:`load_rows` will load ``src``: ``(kind, target)``, kind one of
    ``"local-dir"``, ``"parquet"``, ``"hub-data-files"``, ``"hub"`` (spec 1.1 order).

    Example:
        >>> resolve_source(SourceSpec("lmms-lab/VQAv2", "validation"))
        ('hub', 'lmms-lab/VQAv2')
        >>> resolve_source(SourceSpec("lmms-lab/VQAv2", "validation"), override="/no/such/dir")
        Traceback (most recent call last):
        ...
        FileNotFoundError: data override '/no/such/dir' for lmms-lab/VQAv2 [validation] does not exist: expected a directory laid out as <dir>/data/validation-*.parquet, a parquet file or a glob of parquet files
    """
    if override is not None:
        local = _local_target(str(override))
        if local is None:
            raise FileNotFoundError(
                f"data override {str(override)!r} for {src.describe()} does not exist: "
                f"expected a directory laid out as <dir>/data/{src.split}-*.parquet, a "
                f"parquet file or a glob of parquet files")
        kind, target = local
        return ("local-dir" if kind == "dir" else "parquet"), target
    local = _local_target(src.hub_id)
    if local is not None:
        kind, target = local
        return ("local-dir" if kind == "dir" else "parquet"), target
    if _looks_like_path(src.hub_id):
        raise FileNotFoundError(
            f"{src.hub_id!r} is neither an existing local path nor a hub id of the form "
            f"'owner/name'; check the path")
    if src.data_files:
        return "hub-data-files", src.data_files
    return "hub", src.hub_id


def load_rows(src: SourceSpec, override: Optional[str] = None) -> "datasets.Dataset":
    """The rows of ``src`` as a ``datasets.Dataset`` (images decoded lazily per row).

    Resolution order (eval spec 1.1): a local ``override`` directory
    (``load_dataset(dir, split=)``, laid out as ``<dir>/data/<split>-*.parquet``); an
    ``override`` parquet file or glob; ``src.data_files``; the hub id with its config
    and revision. A local ``hub_id`` is treated like an override.

    Example:
        >>> import tempfile
        >>> from datasets import Dataset
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = f"{tmp.name}/rows.parquet"
        >>> _ = Dataset.from_dict({"text": ["a", "b", "c"]}).to_parquet(path)
        >>> list(load_rows(SourceSpec(path, "train"))["text"])
        ['a', 'b', 'c']
        >>> load_rows(SourceSpec("x/y", "test"), override=f"{tmp.name}/*.parquet").num_rows
        3
        >>> tmp.cleanup()
    """
    import datasets

    kind, target = resolve_source(src, override)
    try:
        if kind == "local-dir":
            return datasets.load_dataset(target, split=src.split)
        if kind in ("parquet", "hub-data-files"):
            return datasets.load_dataset("parquet", data_files={src.split: target},
                                         split=src.split)
        return datasets.load_dataset(src.hub_id, name=src.config, split=src.split,
                                     revision=src.revision)
    except RuntimeError as err:
        if "scripts are no longer supported" not in str(err):
            raise
        raise ScriptDatasetError(
            f"{target} is a dataset loading script ({err}). datasets>=4 cannot run "
            f"scripts and tl_vlm never passes trust_remote_code; instead, "
            f"{_parquet_hint(src.hub_id, src.split, src.config)}") from err
    except (datasets.exceptions.DataFilesNotFoundError,
            datasets.data_files.EmptyDatasetError) as err:
        scripts = sorted(p.name for p in Path(target).glob("*.py")) if kind == "local-dir" else []
        if scripts:
            raise ScriptDatasetError(
                f"{target} holds a loading script ({', '.join(scripts)}) and no data "
                f"files. datasets>=4 cannot run scripts; instead, "
                f"{_parquet_hint(src.hub_id, src.split, src.config)}") from err
        raise FileNotFoundError(
            f"{target} holds no data files for {src.describe()}: expected "
            f"{target}/data/{src.split}-*.parquet ({err})") from err
    except ValueError as err:
        if "Unknown split" not in str(err):
            raise
        raise ValueError(f"{src.describe()}: {err} (loaded from {target})") from err
    except ConnectionError as err:  # offline mode, or no route to the hub
        raise ConnectionError(
            f"could not reach the hub for {src.describe()} ({err}). On a machine without "
            f"hub access, pass a local copy as override (a directory laid out as "
            f"<dir>/data/{src.split}-*.parquet, or a parquet glob).") from err


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


# --------------------------------------------------------------------------------------
# COCO images
# --------------------------------------------------------------------------------------
class ImageFetchError(OSError):
    """An image URL could not be resolved to a local file.

    Example:
        >>> ImageResolver().resolve("ftp://example.org/a.jpg")
        Traceback (most recent call last):
        ...
        tl_vlm.eval.data.ImageFetchError: cannot resolve image URL 'ftp://example.org/a.jpg': expected http(s):// or file://
    """


def default_image_cache() -> Path:
    """``$TL_VLM_IMAGE_CACHE``, else ``~/.cache/tl_vlm/images``.

    Example:
        >>> import os
        >>> default_image_cache() == (Path(os.environ["TL_VLM_IMAGE_CACHE"])
        ...     if os.environ.get("TL_VLM_IMAGE_CACHE") else Path.home() / ".cache/tl_vlm/images")
        True
    """
    return Path(os.environ.get("TL_VLM_IMAGE_CACHE")
                or Path.home() / ".cache" / "tl_vlm" / "images")


class ImageResolver:
    """Turns an image URL (COCO Karpathy's ``url``) into a local file, trying in order:

    1. ``coco_root / filepath / filename`` (``--coco-root``: the unzipped COCO images);
    2. the content cache ``cache_dir / sha1(url)`` (shared by shards: downloads are
       written to a temporary file and renamed into place);
    3. a ``file://`` URL, read in place;
    4. an HTTP GET with ``retries`` attempts, stored in the cache; failing that, an
       :class:`ImageFetchError` that says how to provide the images offline.

    Example:
        >>> import pathlib, tempfile
        >>> from PIL import Image
        >>> tmpdir = tempfile.TemporaryDirectory()
        >>> tmp = pathlib.Path(tmpdir.name)
        >>> Image.new("RGB", (4, 4), "red").save(tmp / "a.png")
        >>> resolver = ImageResolver(cache_dir=tmp / "cache")
        >>> resolver.resolve((tmp / "a.png").as_uri()) == tmp / "a.png"
        True
        >>> resolver.open({"url": (tmp / "a.png").as_uri()}).getpixel((0, 0))
        (255, 0, 0)
        >>> (tmp / "root" / "val2014").mkdir(parents=True)
        >>> Image.new("RGB", (4, 4)).save(tmp / "root" / "val2014" / "b.jpg")
        >>> ImageResolver(coco_root=tmp / "root").resolve(
        ...     "http://images.cocodataset.org/val2014/b.jpg", "val2014", "b.jpg").name
        'b.jpg'
        >>> tmpdir.cleanup()
    """

    def __init__(self, coco_root: Union[str, Path, None] = None,
                 cache_dir: Union[str, Path, None] = None, retries: int = 3,
                 timeout: float = 30.0, backoff: float = 1.0) -> None:
        self.coco_root = None if coco_root is None else Path(coco_root).expanduser()
        if self.coco_root is not None and not self.coco_root.is_dir():
            raise FileNotFoundError(f"coco_root {str(coco_root)!r} is not a directory; "
                                    f"expected the folder holding val2014/ (COCO images)")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_image_cache()
        if retries < 1:
            raise ValueError(f"retries must be >= 1, got {retries}")
        self.retries, self.timeout, self.backoff = retries, timeout, backoff

    def cache_path(self, url: str) -> Path:
        return self.cache_dir / hashlib.sha1(url.encode()).hexdigest()

    def resolve(self, url: str, filepath: Optional[str] = None,
                filename: Optional[str] = None) -> Path:
        """A local file holding the image at ``url`` (downloaded into the cache if needed)."""
        tried = []
        if self.coco_root is not None and filename:
            local = self.coco_root / (filepath or "") / filename
            if local.is_file():
                return local
            tried.append(f"{local} (missing)")
        cached = self.cache_path(url)
        if cached.is_file():
            return cached
        tried.append(f"{cached} (not cached)")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme == "file":
            local = Path(urllib.request.url2pathname(parsed.path))
            if local.is_file():
                return local
            raise ImageFetchError(f"{url}: no such file {local}")
        if parsed.scheme not in ("http", "https"):
            raise ImageFetchError(f"cannot resolve image URL {url!r}: expected http(s):// "
                                  f"or file://")
        self._store(cached, self._download(url, tried))
        return cached

    def resolve_row(self, row: Mapping[str, Any]) -> Path:
        """:meth:`resolve` for a COCO Karpathy row (``url``, ``filepath``, ``filename``)."""
        if "url" not in row:
            raise KeyError(f"expected a row with a 'url' column, got columns {sorted(row)}")
        return self.resolve(row["url"], row.get("filepath"), row.get("filename"))

    def open(self, row_or_url: Union[str, Mapping[str, Any]]) -> "PILImage.Image":
        """The image as an RGB PIL image."""
        from PIL import Image

        path = (self.resolve(row_or_url) if isinstance(row_or_url, str)
                else self.resolve_row(row_or_url))
        with Image.open(path) as im:
            return im.convert("RGB")

    def _download(self, url: str, tried: list[str]) -> bytes:
        last: Optional[BaseException] = None
        for attempt in range(self.retries):
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "tl_vlm"})
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data = response.read()
                _check_image_bytes(url, data)
                return data
            except urllib.error.HTTPError as err:
                last = err
                if 400 <= err.code < 500 and err.code != 429:  # will not get better
                    break
            except (OSError, ValueError) as err:  # URLError, timeouts, refused sockets
                last = err
            if attempt + 1 < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        raise ImageFetchError(
            f"could not download {url} after {self.retries} attempt(s): {last}. Tried "
            f"first: {'; '.join(tried)}. To run without network, pass coco_root=DIR "
            f"(--coco-root DIR) holding <filepath>/<filename> (the COCO val2014 images), "
            f"or fill the image cache {self.cache_dir} (one file per image, named "
            f"sha1(url)) on a machine that can reach the URL, e.g. with "
            f"ImageResolver().resolve_row(row) for the selected rows.") from last

    def _store(self, target: Path, data: bytes) -> None:
        """Write into the cache atomically: concurrent shards see a whole file or none."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _check_image_bytes(url: str, data: bytes) -> None:
    """Refuse to cache a response that is not an image (an HTML error page, say)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{url} did not return an image ({len(data)} bytes: {err})") from err


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


class RowImage(LazyImage):
    """The image of one dataset row, decoded only when a batch needs it.

    Example:
        >>> from datasets import Dataset
        >>> from PIL import Image
        >>> ds = Dataset.from_dict({"image": [Image.new("RGB", (4, 4), "red")]})
        >>> RowImage(ds, 0).load().getpixel((0, 0))
        (255, 0, 0)
    """

    def __init__(self, rows: "datasets.Dataset", index: int, column: str = "image") -> None:
        self.rows, self.index, self.column = rows, int(index), column

    def load(self) -> "PILImage.Image":
        image = self.rows[self.index][self.column]
        return image.convert("RGB") if image.mode != "RGB" else image

    def __repr__(self) -> str:
        return f"RowImage(row {self.index}, column {self.column!r})"


class UrlImage(LazyImage):
    """A COCO row's image, resolved by an :class:`ImageResolver` when first needed.

    Example:
        >>> import pathlib, tempfile
        >>> from PIL import Image
        >>> tmp = tempfile.TemporaryDirectory()
        >>> Image.new("RGB", (4, 4), "blue").save(f"{tmp.name}/b.png")
        >>> url = pathlib.Path(f"{tmp.name}/b.png").as_uri()
        >>> UrlImage(ImageResolver(cache_dir=tmp.name), {"url": url}).load().getpixel((0, 0))
        (0, 0, 255)
        >>> tmp.cleanup()
    """

    def __init__(self, resolver: "ImageResolver", row: Mapping[str, Any]) -> None:
        self.resolver = resolver
        self.row = {k: row.get(k) for k in ("url", "filepath", "filename")}

    def resolve(self) -> Path:
        """The local file (downloaded into the cache if needed)."""
        return self.resolver.resolve_row(self.row)

    def load(self) -> "PILImage.Image":
        return self.resolver.open(self.row)

    def __repr__(self) -> str:
        return f"UrlImage({self.row['url']!r})"


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
