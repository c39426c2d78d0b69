"""User-facing errors. The CLIs print these as one line and exit non-zero."""


class ConchShellError(Exception):
    """An error caused by the user's input (a file, a path, a config), not by a bug."""


class CheckpointError(ConchShellError):
    """A weights file is missing, unreadable, or does not fit the model."""


class ConfigError(ConchShellError):
    """A config file or override is malformed: unknown key, wrong type, bad value."""


class DataError(ConchShellError):
    """An image, audio file or dataset manifest is missing, unreadable or inconsistent."""
