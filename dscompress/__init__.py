"""dscompress: gated, resumable compression recipes for Qwen, DeepSeek and Llama-family checkpoints.

The library's entry point is `dscompress.run(recipe_path)`; the CLI (`dscompress run recipe.yaml`) wraps it.
"""

from dscompress.version import __version__

__all__ = ["__version__", "run"]


def run(recipe_path, out=None):
    """Run a recipe file; returns the report dict. Raises DscompressError subclasses on known failures."""
    from pathlib import Path

    from dscompress.recipe import load_recipe
    from dscompress.runner import Runner

    recipe, located = load_recipe(Path(recipe_path))
    return Runner(recipe, Path(recipe_path), out, located=located).run()
