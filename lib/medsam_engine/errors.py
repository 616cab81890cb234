"""Exception types the engine raises; callers map them to user-facing errors."""


class EngineInputError(ValueError):
    """The caller's input is wrong (bad box, slice out of range, unreadable file): a 4xx in a server."""


class ModelLoadError(RuntimeError):
    """A model or checkpoint cannot be loaded; the message names the path."""
