"""Every private name of another package that tl_vlm relies on, in one place.

A private name (``_adapters``, ``_attn_implementation``...) can change in any upstream
release without notice. tl_vlm uses as few as it can, reads each one only through the
functions below, and lists each in :data:`PRIVATE_NAMES` with what it is for and the
versions it was checked on. ``tests/test_compat.py`` checks that every listed name
still exists in the installed versions, so a release that removes one fails there, by
name, instead of somewhere deep in a forward pass (``bash scripts/test --latest``).

Names that are only module layout (a public function in a module that is not a public
import path) are listed too: they break the same way.

This module imports nothing heavy at import time: ``tl_vlm._autoload`` uses it at
interpreter start-up.

Example:
    >>> from tl_vlm.core import compat
    >>> sorted({name.package for name in compat.PRIVATE_NAMES})
    ['plotly', 'torch', 'transformer-lens', 'transformers']
    >>> compat.missing_private_names()
    []
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

#: the releases the test suite passed on with every name below (the full tested set is
#: constraints.txt; README, "Versions", says how the range was measured)
CHECKED_ON: dict[str, tuple[str, ...]] = {
    "torch": ("2.13.0",),
    "transformers": ("5.23.0", "5.25.0"),
    "transformer-lens": ("4.3.0",),
    "plotly": ("7.1.0",),
}

TL_FACTORY_MODULE = "transformer_lens.factories.architecture_adapter_factory"
TL_HELPERS_MODULE = "transformer_lens.model_bridge.sources.transformers.helpers"


@dataclass(frozen=True)
class PrivateName:
    """One private upstream name tl_vlm uses.

    Example:
        >>> from tl_vlm.core.compat import PRIVATE_NAMES
        >>> PRIVATE_NAMES[0].package, PRIVATE_NAMES[0].exists()
        ('transformer-lens', True)

    Attributes:
        package: the distribution that owns it (``pip show`` name).
        name: where it lives: ``module:attribute.path``; an attribute of instances is
            written on its class (``torch.nn:Module._forward_hooks``).
        used_for: why tl_vlm needs it, and what breaks without it.
        exists: a check that the installed release still has it.
    """

    package: str
    name: str
    used_for: str
    exists: Callable[[], bool]

    def __repr__(self) -> str:
        return f"PrivateName({self.package}: {self.name})"


def _resolve(path: str) -> Any:
    module, _, attributes = path.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, attributes.split(".")):
        obj = getattr(obj, part)
    return obj


def _has(path: str) -> Callable[[], bool]:
    def exists() -> bool:
        try:
            _resolve(path)
        except (ImportError, AttributeError):
            return False
        return True
    return exists


def _torch_module_has_hook_dicts() -> bool:
    import torch

    module = torch.nn.Module()
    return all(isinstance(getattr(module, name, None), dict) for name in _HOOK_DICTS)


def _config_has_attn_implementation() -> bool:
    from transformers import PretrainedConfig

    config = PretrainedConfig()
    return (hasattr(config, "_attn_implementation_internal")
            and isinstance(getattr(type(config), "_attn_implementation", None), property))


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

PRIVATE_NAMES: tuple[PrivateName, ...] = (
    PrivateName(
        "transformer-lens", f"{TL_FACTORY_MODULE}:ArchitectureAdapterFactory._adapters",
        "the factory's copy of the architecture table: TL 4.3 looks adapters up there and in "
        "SUPPORTED_ARCHITECTURES only, so tl_vlm's adapters must be put in both "
        "(tl_vlm._autoload.register)",
        _has(f"{TL_FACTORY_MODULE}:ArchitectureAdapterFactory._adapters")),
    PrivateName(
        "transformer-lens", f"{TL_HELPERS_MODULE}:_ensure_torchvision",
        "TL pip-installs torchvision when a processor fails to load; tl_vlm replaces the "
        "helper with an availability check (no installs at run time)",
        _has(f"{TL_HELPERS_MODULE}:_ensure_torchvision")),
    PrivateName(
        "transformers", "transformers:PretrainedConfig._attn_implementation",
        "which attention function a (sub)model runs: tl_vlm's for the text decoder, the "
        "default for vision towers (transformers' own modeling code reads it the same way); "
        "set through _attn_implementation_internal",
        _config_has_attn_implementation),
    PrivateName(
        "transformers",
        "transformers.models.pixtral.image_processing_pil_pixtral:get_resize_output_image_size",
        "module layout: PixtralProcessor's module imports this helper from the torchvision "
        "image-processor module; tl_vlm provides it from the PIL one when torchvision is "
        "missing (tl_vlm.core.hf_compat)",
        _has("transformers.models.pixtral.image_processing_pil_pixtral:"
             "get_resize_output_image_size")),
    PrivateName(
        "torch", "torch.nn:Module._forward_hooks (and _forward_pre_hooks, _backward_hooks, "
        "_backward_pre_hooks)",
        "whether anything hooks a hook point around TransformerLens' API, which decides "
        "between fused and eager attention (tl_vlm.core.attention)",
        _torch_module_has_hook_dicts),
    PrivateName(
        "torch", "torch.utils._python_dispatch:TorchDispatchMode",
        "the tests count which attention kernels a forward dispatches (no public path)",
        _has("torch.utils._python_dispatch:TorchDispatchMode")),
    PrivateName(
        "plotly", "plotly.io._base_renderers:NotebookRenderer",
        "the base of tl_vlm's offline notebook renderer (plotly.js embedded once, no CDN)",
        _has("plotly.io._base_renderers:NotebookRenderer")),
)


def missing_private_names() -> list[PrivateName]:
    """The listed names the installed releases no longer have (empty when all is well).

    Example:
        >>> missing_private_names()
        []
    """
    return [name for name in PRIVATE_NAMES if not name.exists()]


# -- the accessors: the only places tl_vlm touches these names -------------------------
def tl_adapter_tables(factory_module: Any) -> tuple[dict, dict]:
    """TransformerLens' two architecture -> adapter tables: ``SUPPORTED_ARCHITECTURES``
    (public) and the factory's copy (private), which must agree.

    Example:
        >>> from transformer_lens.factories import architecture_adapter_factory as factory
        >>> public, private = tl_adapter_tables(factory)
        >>> "LlavaForConditionalGeneration" in public and "LlavaForConditionalGeneration" in private
        True
    """
    return (factory_module.SUPPORTED_ARCHITECTURES,
            factory_module.ArchitectureAdapterFactory._adapters)


def replace_tl_torchvision_installer(check: Callable[[], bool]) -> None:
    """Make TL call ``check`` where it would ``pip install torchvision``.

    Example:
        >>> before = tl_torchvision_installer()
        >>> replace_tl_torchvision_installer(lambda: False)
        >>> tl_torchvision_installer()()
        False
        >>> replace_tl_torchvision_installer(before)
    """
    helpers = importlib.import_module(TL_HELPERS_MODULE)
    helpers._ensure_torchvision = check


def tl_torchvision_installer() -> Callable[[], bool]:
    """What TL calls today where it would install torchvision.

    Example:
        >>> callable(tl_torchvision_installer())
        True
    """
    return importlib.import_module(TL_HELPERS_MODULE)._ensure_torchvision


def attn_implementation(config: Any) -> str:
    """The attention implementation a (sub)config selects.

    Example:
        >>> from transformers import LlamaConfig
        >>> attn_implementation(LlamaConfig(attn_implementation="eager"))
        'eager'
    """
    return config._attn_implementation


def set_attn_implementation(config: Any, name: Any) -> None:
    """Select an attention implementation on one config only (not its sub-configs).

    Example:
        >>> from transformers import LlamaConfig
        >>> config = LlamaConfig(attn_implementation="eager")
        >>> set_attn_implementation(config, "sdpa"); attn_implementation(config)
        'sdpa'
    """
    config._attn_implementation_internal = name


def hook_dicts(module: Any) -> dict[str, dict]:
    """A module's forward/backward hook dicts, by name (``_forward_hooks``...).

    Example:
        >>> import torch
        >>> module = torch.nn.Identity()
        >>> _ = module.register_forward_hook(lambda m, i, o: o)
        >>> {name: len(hooks) for name, hooks in hook_dicts(module).items()}["_forward_hooks"]
        1
    """
    return {name: getattr(module, name) for name in _HOOK_DICTS}


def plotly_notebook_renderer_base() -> type:
    """plotly's notebook renderer class, to subclass.

    Example:
        >>> plotly_notebook_renderer_base().__name__
        'NotebookRenderer'
    """
    return _resolve("plotly.io._base_renderers:NotebookRenderer")


def torch_dispatch_mode() -> type:
    """torch's ``TorchDispatchMode`` base class, to subclass.

    Example:
        >>> torch_dispatch_mode().__name__
        'TorchDispatchMode'
    """
    return _resolve("torch.utils._python_dispatch:TorchDispatchMode")
