"""Errors that stop a run early with one readable message (no traceback needed to act on them)."""


class MTLError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(MTLError, ValueError):
    """A configuration value is invalid (raised before any training or tracking starts)."""


class DataError(MTLError):
    """Input data is missing or malformed."""


class TrackingError(MTLError):
    """The MLflow tracking store cannot be reached or written."""


class NonFiniteLossError(MTLError, FloatingPointError):
    """A task loss became NaN or infinite during training."""


class DivergenceError(MTLError):
    """Training diverged (a loss or a norm far beyond its bound; ``module.divergence=stop``)."""


class StorageError(MTLError):
    """A folder or file the run must write (outputs, checkpoints, artifacts) cannot be written."""
