"""Where rows come from: one loader for the hub and local copies.

:func:`load_rows` takes a :class:`SourceSpec` (a hub id with split, revision, config or
parquet ``data_files``) and an optional ``override`` (a local directory or parquet glob)
so that a test and a hub run go through the same call; ``trust_remote_code`` is never
passed (a script-based source gets an error naming the parquet source to use instead).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from typing import TYPE_CHECKING



if TYPE_CHECKING:  # imported on first use: importing tl_vlm stays light
    import datasets


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
        >>> from tl_vlm.eval.paper_sets import SOURCES
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
