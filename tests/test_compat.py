"""Private upstream names: every one tl_vlm uses is listed in ``tl_vlm.core.compat``, still
exists in the installed releases, and is touched nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tl_vlm.core import compat

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ("transformers", "transformer_lens", "torch", "plotly", "datasets", "accelerate",
            "huggingface_hub", "tokenizers")
#: the private attribute names of upstream objects listed in tl_vlm.core.compat, plus those the
#: suite once read and must not read again
PRIVATE_ATTRIBUTES = {"_adapters", "_ensure_torchvision", "_attn_implementation",
                      "_attn_implementation_internal", "_forward_hooks", "_forward_pre_hooks",
                      "_backward_hooks", "_backward_pre_hooks", "_get_num_multimodal_tokens",
                      "_tokenizer", "_original_component", "_modules"}


def _sources() -> list[Path]:
    files = sorted((ROOT / "tl_vlm").rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
    return [f for f in files if f.name != "compat.py" and f != Path(__file__).resolve()]


@pytest.mark.parametrize("name", compat.PRIVATE_NAMES, ids=lambda n: n.name.split(":")[-1])
def test_listed_private_name_exists_in_the_installed_release(name):
    import importlib.metadata

    version = importlib.metadata.version(name.package)
    assert name.exists(), (
        f"{name.package} {version} no longer has {name.name}, which tl_vlm uses for: "
        f"{name.used_for}. Checked on {compat.CHECKED_ON.get(name.package)}; "
        f"fix tl_vlm.core.compat (and the code it serves), or cap {name.package} below {version}")


def test_every_listed_package_has_checked_versions():
    assert {n.package for n in compat.PRIVATE_NAMES} <= set(compat.CHECKED_ON)


def test_no_private_upstream_import_outside_compat():
    """``from transformers.x._y import z`` / ``import plotly.io._base`` / ``import _z``."""
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                parts, names = [], []
                for alias in node.names:
                    if alias.name.split(".")[0] in UPSTREAM and any(
                            p.startswith("_") for p in alias.name.split(".")):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} import {alias.name}")
                continue
            else:
                continue
            if parts[0] not in UPSTREAM:
                continue
            if any(p.startswith("_") for p in parts) or any(
                    n.startswith("_") and not n.startswith("__") for n in names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import "
                             f"{', '.join(names)}")
    assert found == [], "private upstream imports outside tl_vlm.core.compat:\n" + "\n".join(found)


def test_known_private_attributes_are_read_only_in_compat():
    """``x._attn_implementation`` and the like appear only in tl_vlm/compat.py."""
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert found == [], "private upstream attributes outside tl_vlm.core.compat:\n" + "\n".join(found)
