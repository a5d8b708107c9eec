"""mambazoo model zoo: registry, variants, tasks and data."""

from zoo.registry import create_model, describe_model, list_models, register_model

# Importing the Vim package registers vim_{tiny,small,base}_patch16_224 with timm, so that
# `import zoo; timm.create_model("vim_tiny_patch16_224")` works.
import zoo.vim  # noqa: E402,F401

__all__ = ["create_model", "describe_model", "list_models", "register_model"]
