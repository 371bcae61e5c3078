"""Defer an optional dependency that MONAI's import chain pays for on every start.

``import monai`` imports ``monai.bundle``, which imports ``jsonschema``; when ``rfc3987-syntax`` is installed
(``jsonschema[format-nongpl]``, which JupyterLab's ``jupyter-events`` asks for) jsonschema imports it to check the
``iri`` formats, and that module builds some 30 Lark parsers at import: about 4 s of a 13 s ``import tfg_core.demo``
on a 2-core CPU, in every process and notebook kernel, for a check nothing here uses. Installed before MONAI is
imported, a stand-in module takes its place; the first call of any of its functions imports the real module, which
then replaces the stand-in, so jsonschema's ``iri`` checks behave as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

MODULE = "rfc3987_syntax"
# its public functions: jsonschema takes ``is_valid_syntax`` by name when it is imported
_FUNCTIONS = ("parse", "make_syntax_validator")


class _DeferredModule(types.ModuleType):
    """Stands in for ``rfc3987_syntax`` until one of its functions is called or another attribute is read."""

    def __getattr__(self, name: str):
        if name.startswith("__"):  # the import system asks for __path__ etc.: a plain module has none
            raise AttributeError(name)
        if name.startswith("is_valid_syntax") or name in _FUNCTIONS:
            def deferred(*args, **kwargs):
                return getattr(self.load(), name)(*args, **kwargs)

            deferred.__name__ = deferred.__qualname__ = name
            return deferred
        return getattr(self.load(), name)

    def load(self) -> types.ModuleType:
        """Import the real module (it replaces this one in ``sys.modules``) and return it; once per process."""
        real = self.__dict__.get("_real")
        if real is None:  # jsonschema keeps the deferred function: later checks must not repeat the import lookup
            if sys.modules.get(MODULE) is self:
                del sys.modules[MODULE]
            real = self._real = importlib.import_module(MODULE)
        return real


def defer_rfc3987_syntax() -> bool:
    """Put the stand-in for ``rfc3987_syntax`` in ``sys.modules``; True when it was put there.

    Nothing is done when the module is already imported, or when it or its parser library (``lark``) is not
    installed: then jsonschema's own ``ImportError`` path runs, as it would without this.
    """
    if MODULE in sys.modules:
        return False
    try:
        installed = all(importlib.util.find_spec(name) is not None for name in (MODULE, "lark"))
    except (ImportError, ValueError):
        return False
    if not installed:
        return False
    sys.modules[MODULE] = _DeferredModule(MODULE, __doc__)
    return True
