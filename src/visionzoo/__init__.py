"""visionzoo: reproducible training recipes for classic image classifiers on PyTorch.

The Python API (visionzoo/api.py) is reached from here without importing torch until it is used:
``visionzoo.recipes()``, ``visionzoo.load_recipe(name, **overrides)``, ``visionzoo.train(...)``,
``visionzoo.load(run)``, ``visionzoo.predict(model_or_run, images)``."""

from visionzoo.version import __version__ as __version__

_API = ("load_recipe", "train", "load", "predict", "Run", "Loaded")


def __getattr__(name: str):
    # Lazy: `import visionzoo` stays light (the CLI answers errors before torch loads).
    if name in _API:
        from visionzoo import api

        return getattr(api, name)
    if name == "recipes":  # the callable recipes package (see visionzoo/recipes/__init__.py)
        import importlib

        return importlib.import_module("visionzoo.recipes")
    raise AttributeError(f"module 'visionzoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API, "recipes"])
