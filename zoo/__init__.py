"""mambazoo model zoo: registry, variants, tasks and data."""

from zoo.registry import create_model, describe_model, list_models, register_model

__all__ = ["create_model", "describe_model", "list_models", "register_model"]
