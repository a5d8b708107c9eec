"""Errors the zoo raises on purpose. Importing this module loads nothing else, so the CLI can catch them
without importing torch or Lightning."""


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss was NaN or infinite; the message names the step and the
    checkpoint saved just before stopping."""
