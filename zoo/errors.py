"""Errors the zoo raises on purpose. Importing this module loads nothing else, so the CLI can catch them
without importing torch or Lightning."""


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss was NaN or infinite; the message names the step and the
    checkpoint saved just before stopping."""


class WeightsFileError(ValueError):
    """A weights or checkpoint file that cannot be read as one (empty, truncated, not a weights format, or
    holding pickled code); the message names the path, the format expected and what was found."""


class RunExistsError(ValueError):
    """``fit`` into a run folder that already holds checkpoints, without resuming or starting over."""
