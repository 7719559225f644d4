"""The recipe YAML files shipped with visionzoo (config.py reads them as package data).

The package is also the Python API's ``visionzoo.recipes()``: calling it lists the recipe
names. A plain function of that name in visionzoo/__init__.py would be replaced by this
package as soon as it is imported, so the package itself is made callable."""

import sys
import types


class _RecipesPackage(types.ModuleType):
    def __call__(self) -> list[str]:
        """The names of the recipes shipped with visionzoo (``visionzoo recipes`` lists them with details)."""
        from visionzoo.config import recipe_names

        return recipe_names()


sys.modules[__name__].__class__ = _RecipesPackage
