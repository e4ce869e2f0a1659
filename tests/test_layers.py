"""The layers the design promises: data flows one way, and the store needs no torch."""

from __future__ import annotations

import inspect
import subprocess
import sys
import tempfile

import mmpack


def _imports(statement: str) -> set[str]:
    # A fresh interpreter, outside the checkout (the source tree has no compiled extension).
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tempfile.gettempdir(), check=True)
    return set(done.stdout.split())


def test_the_store_layer_imports_nothing_above_it_and_no_torch():
    loaded = _imports("import mmpack.store, mmpack.store.local, mmpack.store.fsspec_store, mmpack.store.urls")
    assert "torch" not in loaded
    above = {"mmpack.fileformat", "mmpack.modelset", "mmpack.approaches", "mmpack.repository", "mmpack.objects"}
    assert not {m for m in loaded if m.split(".")[:2] and ".".join(m.split(".")[:2]) in above}


def test_every_public_name_is_documented_and_importable():
    for name in mmpack.__all__:
        value = getattr(mmpack, name)
        assert (getattr(value, "__doc__", None) or "").strip(), f"mmpack.{name} has no docstring"
    for name in mmpack.__all__:
        value = getattr(mmpack, name)
        if not isinstance(value, type):
            continue
        for member, attribute in vars(value).items():
            if member.startswith("_") or not (callable(attribute) or isinstance(attribute, property)):
                continue
            doc = attribute.__doc__ if isinstance(attribute, property) else inspect.getdoc(getattr(value, member))
            assert (doc or "").strip(), f"mmpack.{name}.{member} has no docstring"
