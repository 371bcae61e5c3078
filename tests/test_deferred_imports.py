"""The stand-in for rfc3987_syntax: importing jsonschema (as MONAI does) no longer builds its parsers, and
jsonschema's iri checks are unchanged."""

import subprocess
import sys

import pytest

CHECKS = ("http://example.com/a?b#c", "iri"), ("not an iri", "iri"), ("a b", "iri-reference"), ("../a/b", "iri-reference")
PROBE = f"""
import sys
{{setup}}
import jsonschema  # what MONAI's import chain (monai.bundle) imports
deferred = type(sys.modules.get("rfc3987_syntax")).__name__
from jsonschema import FormatChecker
checker = FormatChecker()
print(deferred, [checker.conforms(value, kind) for value, kind in {CHECKS!r}],
      type(sys.modules.get("rfc3987_syntax")).__name__)
"""


def _probe(setup: str) -> list[str]:
    # a fresh interpreter: this one may have imported the real module already
    result = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().split(" ", 1)


def test_jsonschema_import_leaves_the_parsers_unbuilt_and_iri_checks_agree():
    pytest.importorskip("rfc3987_syntax")
    deferred, rest = _probe("import tfg_core")
    assert deferred == "_DeferredModule"  # jsonschema imported, the real module not yet
    # RFC 3987's verdicts (a space is no IRI character), and after the first check the real module is in place
    assert rest == "[True, False, False, True] module"


def test_no_stand_in_over_an_imported_or_missing_module(monkeypatch):
    from tfg_core import _deferred_imports

    monkeypatch.setitem(sys.modules, "rfc3987_syntax", object())
    assert not _deferred_imports.defer_rfc3987_syntax()  # already imported: left alone
    monkeypatch.delitem(sys.modules, "rfc3987_syntax")
    monkeypatch.setattr(_deferred_imports.importlib.util, "find_spec", lambda name: None)
    assert not _deferred_imports.defer_rfc3987_syntax() and "rfc3987_syntax" not in sys.modules
