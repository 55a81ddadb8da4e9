"""The contract of a VLM family, and the registry that finds the family files.

A family (:class:`Family`) is what tl_vlm knows about one kind of checkpoint: the HF
architecture names it covers, its TransformerLens adapter and its
:class:`~tl_vlm.core.layout.ImageLayout`. Each lives in its own file in
:mod:`tl_vlm.adapters`, which defines ``FAMILY``; :func:`families` finds them by
name, so core depends on the contract only, never on a family.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

from tl_vlm.core.layout import ImageLayout


@dataclass(frozen=True)
class Family:
    """One VLM family as tl_vlm supports it.

    Attributes:
        name: short name used in docs and errors ("chameleon").
        architectures: HF ``config.architectures`` names this family covers.
        adapter: the TransformerLens ``ArchitectureAdapter`` subclass to use.
        layout: the image-token layout class.
        example_ids: hub ids, for docs and error messages.
        matches: optional predicate on the HF config, for architectures shared by two
            families (a Llava checkpoint with a Pixtral tower is the pixtral family).
        final_logits: what the HF forward does to ``lm_head``'s output, as
            ``model -> (logits -> logits)``; None when it returns it unchanged. The logit
            lens applies it so that lensing the last residual gives the model's logits.
        title: the name people use ("LLaVA-1.5"), for tables; default ``name``.
        image_tokens: what an image becomes in the token sequence, in Markdown, for
            tables; default: written from the layout's tokens (:meth:`describe_tokens`).

    Example:
        >>> llava = next(f for f in families() if f.name == "llava")
        >>> llava.architectures, llava.layout.__name__
        (('LlavaForConditionalGeneration',), 'LlavaLayout')
    """

    name: str
    architectures: tuple[str, ...]
    adapter: type
    layout: type[ImageLayout]
    example_ids: tuple[str, ...] = ()
    matches: Optional[Any] = field(default=None, compare=False)
    final_logits: Optional[Any] = field(default=None, compare=False)
    title: str = ""
    image_tokens: str = ""

    def describe_tokens(self) -> str:
        """What an image becomes in the token sequence: :attr:`image_tokens`, or one
        written from the layout's tokens (BOI + content (+ row breaks) + EOI).

        Example:
            >>> from tl_vlm.adapters.gemma3 import Gemma3Layout
            >>> Family("demo", (), object, Gemma3Layout).describe_tokens()
            '`<start_of_image>` + `<image_soft_token>` per feature + `<end_of_image>`'
        """
        if self.image_tokens:
            return self.image_tokens
        layout = self.layout
        parts = [f"`{layout.boi_token}`"] if layout.boi_token else []
        content = f"`{layout.content_token}` per feature"
        if layout.row_break_token:
            content += f", `{layout.row_break_token}` after each row"
        parts.append(content)
        if layout.eoi_token:
            parts.append(f"`{layout.eoi_token}`")
        return " + ".join(parts)

    @property
    def verified(self) -> dict[str, Any]:
        """What the test suite checks for this family and which real checkpoints were run
        (``verified_families.json``, written from the tests by
        ``scripts/families_table.py``; ``tests/test_family_table.py`` keeps it current):
        ``tiny_exact`` (logits equal Hugging Face's on a tiny random checkpoint),
        ``real_size`` (image size -> image tokens at the released processor settings,
        checked against the processor's own marks), ``checkpoints`` (rows of
        ``docs/verified-models.md``).

        Example:
            >>> llava = next(f for f in families() if f.name == "llava")
            >>> llava.verified["tiny_exact"], llava.verified["real_size"]["480x640"]
            (True, '24x24 = 576')
        """
        return verification_record().get(self.name, {"tiny_exact": False, "real_size": {},
                                                      "checkpoints": []})


#: the packages whose modules are family files (each defines ``FAMILY``)
FAMILY_PACKAGES: list[str] = ["tl_vlm.adapters"]
#: the module of the generic path, for checkpoints no family file claims
#: (:func:`family_for_config` falls back to its ``generic_family``)
GENERIC_MODULE = "tl_vlm.core.generic"
_FAMILIES: Optional[FamilyList] = None
_LOADING = False


class FamilyList(list):
    """The families, as a list of :class:`Family` that shows itself as a table: what
    loads, how, and what was verified (``tl-vlm families`` prints the same).

    Example:
        >>> table = families()
        >>> table[0].name, "| family |" in table.to_markdown()
        ('aya_vision', True)
    """

    HEADER = ("family", "HF class", "example checkpoint", "image tokens", "gate candidate",
              "tiny model = HF", "real-size layout checked", "real checkpoint run")

    def rows(self) -> list[tuple[str, ...]]:
        """One row of :attr:`HEADER` per family, in Markdown."""
        out = []
        for fam in self:
            record = fam.verified
            sizes = record.get("real_size", {})
            out.append((
                fam.title or fam.name,
                ", ".join(f"`{a}`" for a in fam.architectures),
                fam.example_ids[0] if fam.example_ids else "",
                fam.describe_tokens().replace("|", "\\|"),
                fam.layout.gate_description.replace("|", "\\|"),
                "yes" if record.get("tiny_exact") else "no",
                "; ".join(f"{size} -> {tokens}" for size, tokens in sizes.items()) or "no",
                ", ".join(record.get("checkpoints", [])) or "none yet",
            ))
        return out

    def to_markdown(self) -> str:
        """The table in Markdown (the README's and the docs' supported-families table)."""
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        rows = [(r[0].replace("`", ""), r[1].replace("`", ""), r[5], r[7]) for r in self.rows()]
        head = ("family", "HF class", "tiny = HF", "real checkpoint")
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()
                         for row in [head, *rows])

    def _repr_html_(self) -> str:
        import html

        cells = lambda row, tag: "".join(f"<{tag}>{html.escape(x).replace('`', '')}</{tag}>"
                                         for x in row)
        body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in self.rows())
        return f"<table><tr>{cells(self.HEADER, 'th')}</tr>{body}</table>"


_VERIFIED: Optional[dict[str, Any]] = None


def verification_record() -> dict[str, Any]:
    """family name -> what the tests verify and which checkpoints were run
    (``tl_vlm/core/verified_families.json``; see :attr:`Family.verified`).

    Example:
        >>> verification_record()["chameleon"]["tiny_exact"]
        True
    """
    global _VERIFIED
    if _VERIFIED is None:
        import json
        from pathlib import Path

        path = Path(__file__).with_name("verified_families.json")
        _VERIFIED = json.loads(path.read_text()) if path.exists() else {}
    return _VERIFIED


def families() -> FamilyList:
    """All supported families: the ``FAMILY`` of every module of the family packages
    (:data:`FAMILY_PACKAGES`, found by name and imported on first use).

    Core never imports a family module by its name: a family is a file that defines
    ``FAMILY``; adding one is adding a file (CONTRIBUTING.md, "Adding a family").

    In a notebook the list shows as the supported-families table (:class:`FamilyList`).

    Example:
        >>> sorted(f.name for f in families())[:3]
        ['aya_vision', 'chameleon', 'emu3']
    """
    global _FAMILIES, _LOADING
    if _FAMILIES is None:
        loaded = []
        _LOADING = True
        try:
            for package_name in FAMILY_PACKAGES:
                package = importlib.import_module(package_name)
                names = sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                               if not m.name.startswith("_"))
                for m in names:
                    try:
                        loaded.append(importlib.import_module(f"{package_name}.{m}").FAMILY)
                    except Exception as err:  # name the broken family, not a bare ImportError
                        raise RuntimeError(f"tl_vlm family module {m!r} failed to load: "
                                           f"{err!r}") from err
        finally:
            _LOADING = False
        _FAMILIES = FamilyList(loaded)
    return _FAMILIES


def loading() -> bool:
    """Whether :func:`families` cannot list the families now: they are being imported,
    or the family package itself is (its import is what imported TransformerLens).

    Example:
        >>> loading()
        False
    """
    if _LOADING:
        return True
    # A family package sets READY as its last import-time step.
    return any(name in sys.modules and not hasattr(sys.modules[name], "READY")
               for name in FAMILY_PACKAGES)


def tl_adapter_classes() -> dict[str, type]:
    """Architecture name -> the adapter class TransformerLens should use for it.

    One family's adapter where the architecture is that family's alone,
    :class:`SharedArchitectureAdapter` where families share it (a
    ``LlavaForConditionalGeneration`` is LLaVA or Pixtral, by its vision tower).

    Example:
        >>> classes = tl_adapter_classes()
        >>> classes["ChameleonForConditionalGeneration"].__name__
        'ChameleonAdapter'
        >>> classes["LlavaForConditionalGeneration"] is SharedArchitectureAdapter
        True
    """
    owners: dict[str, list[Family]] = {}
    for fam in families():
        for arch in fam.architectures:
            owners.setdefault(arch, []).append(fam)
    out = {}
    for arch, fams in owners.items():
        adapters = {f.adapter for f in fams}
        out[arch] = fams[0].adapter if len(adapters) == 1 else SharedArchitectureAdapter
    return out


class SharedArchitectureAdapter(ArchitectureAdapter):
    """The adapter TransformerLens gets for an architecture several families share.

    ``SharedArchitectureAdapter(cfg)`` builds the adapter of the family the config
    belongs to (:func:`family_for_config`): a ``LlavaForConditionalGeneration`` with a
    Pixtral tower gets :class:`~tl_vlm.adapters.pixtral.PixtralAdapter`, one with a CLIP
    tower :class:`~tl_vlm.adapters.llava.LlavaAdapter`.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> cfg = HookedVLM.from_pretrained("toy-gated").cfg   # a Chameleon: not shared
        >>> type(SharedArchitectureAdapter(cfg)).__name__
        'ChameleonAdapter'
    """

    def __new__(cls, cfg: Any) -> ArchitectureAdapter:  # type: ignore[misc]
        return family_for_config(cfg).adapter(cfg)


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one tl_vlm supports.

    Example:
        >>> from transformers import BertConfig
        >>> family_for_config(BertConfig(architectures=["BertModel"]))
        Traceback (most recent call last):
        ...
        tl_vlm.core.family.UnsupportedModelError: tl_vlm does not support architecture ['BertModel'] ...
    """


def family_for_config(hf_config: Any) -> Family:
    """The family of an HF config, or a clear error listing the supported ones.

    A named family always wins; a checkpoint none claims goes to the generic path
    (:mod:`tl_vlm.core.generic`), which infers what it can for certain and refuses
    (``GenericPathError``, an :class:`UnsupportedModelError`) what it cannot.

    Example:
        >>> from transformers import ChameleonConfig
        >>> family_for_config(ChameleonConfig(architectures=["ChameleonForConditionalGeneration"])).name
        'chameleon'
    """
    # An HF config lists ``architectures``; TransformerLens' bridge config has one ``architecture``.
    archs = list(getattr(hf_config, "architectures", None)
                 or [a for a in [getattr(hf_config, "architecture", None)] if a])
    candidates = [f for f in families() if set(archs) & set(f.architectures)]
    specific = [f for f in candidates if f.matches is not None and f.matches(hf_config)]
    generic = [f for f in candidates if f.matches is None]
    if specific or generic:
        return (specific or generic)[0]
    # No family file: the generic path (found by name, as the families are) maps what it
    # can infer for certain, refuses with GenericPathError what it cannot, and returns
    # None for a checkpoint that is no transformers image-text-to-text model.
    fallback = importlib.import_module(GENERIC_MODULE).generic_family(hf_config)
    if fallback is not None:
        return fallback
    table = "\n".join(
        f"  {f.name:16s} {', '.join(f.architectures)}" for f in families()
    )
    raise UnsupportedModelError(
        f"tl_vlm does not support architecture {archs or '(none in config)'} "
        f"(model_type={getattr(hf_config, 'model_type', None)!r}). Supported families:\n"
        f"{table}\nVILA-U is not in transformers; see the README for what to use instead. "
        f"The generic path (docs/families.md) covers transformers' image-text-to-text models "
        f"only."
    )


from tl_vlm.core import autoload as _autoload  # noqa: E402

_autoload.retry_pending()   # TransformerLens may have been imported while this module was
