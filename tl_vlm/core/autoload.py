"""The start-up hook of :mod:`tl_vlm.core.registration` (standard library only).

``tl_vlm_autoload.pth`` calls :func:`install` in every interpreter of the environment
where tl_vlm is installed: a meta-path hook that, right after TransformerLens' factory
module has been imported, calls :func:`tl_vlm.core.registration.register`. Nothing but
the standard library is imported until TransformerLens itself is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

FACTORY_MODULE = "transformer_lens.factories.architecture_adapter_factory"


#: modules of the registration path and a name each defines last-ish: while one of them is
#: being imported (it imported TransformerLens, which ran this hook), registering waits
_IN_PROGRESS = (("tl_vlm.core.family", "loading"), ("tl_vlm.core.registration", "register_if_imported"),
                ("tl_vlm.core.attention_bridge", "use_hooked_attention"))
_pending = False


def _register() -> None:
    global _pending
    if any(name in sys.modules and not hasattr(sys.modules[name], attr)
           for name, attr in _IN_PROGRESS):
        _pending = True   # tl_vlm itself is importing them: they call retry_pending() when done
        return
    _pending = False
    try:
        importlib.import_module("tl_vlm.core.registration").register_if_imported()
    except Exception as err:  # never break TL's import over tl_vlm; say so instead
        warnings.warn(f"tl_vlm could not register its adapters with TransformerLens "
                      f"({type(err).__name__}: {err}); `import tl_vlm` to see the error")


def retry_pending() -> None:
    """Register now if the hook had to wait for a module of the registration path (called
    at the end of :mod:`tl_vlm.core.family`, :mod:`tl_vlm.core.registration` and
    :mod:`tl_vlm.core.attention_bridge`, the modules that import TransformerLens on the way).

    Example:
        >>> retry_pending()
    """
    if _pending:
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of TL's factory module so registration runs right after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != FACTORY_MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if TL's factory is already imported, else when it is.

    Example:
        >>> install()
    """
    if FACTORY_MODULE in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
