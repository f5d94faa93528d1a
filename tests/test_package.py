"""The package's public names (`from magicme import …`), as the README's Python example uses them."""

import subprocess
import sys
from importlib import import_module
from types import ModuleType

import magicme


def _exports():
    return {name: magicme._EXPORTS[name] for name in magicme.__all__}


def test_every_export_is_the_function_or_class_after_its_submodule_was_imported():
    """Importing `magicme.generate` binds the submodule as an attribute of the package; the exported
    function of the same name must still be what `from magicme import generate` gives."""
    for name, module in _exports().items():
        sub = import_module(f"magicme.{module}")  # the submodule first …
        value = getattr(magicme, name)  # … then the name
        assert not isinstance(value, ModuleType), name
        assert value is getattr(sub, name), name
    from magicme import generate, noise_prior, train, v2v

    assert all(callable(f) and not isinstance(f, ModuleType) for f in (generate, noise_prior, train, v2v))
    assert set(magicme.__all__) <= set(dir(magicme))


def test_exports_in_a_fresh_interpreter_in_either_order():
    """Both orders in new processes: the names first, and every submodule first (then `import *`)."""
    names = ", ".join(sorted(_exports()))
    modules = "; ".join(f"import magicme.{m}" for m in sorted(set(_exports().values())))
    for setup in ("", modules):
        code = (f"{setup}\nfrom types import ModuleType\nfrom magicme import *\nfrom magicme import {names}\n"
                "import magicme\nbad = [n for n in magicme.__all__ if isinstance(globals()[n], ModuleType)]\n"
                "x = noise_prior((1, 4, 3, 2, 2), gamma=0.15)\nprint(bad, tuple(x.shape))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == "[] (1, 4, 3, 2, 2)", out.stdout
