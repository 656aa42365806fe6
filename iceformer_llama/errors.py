"""Errors the CLI turns into one line on stderr and a non-zero exit."""


class IceformerError(Exception):
    """Base class: a user-facing problem with a message that says what to do."""

    exit_code = 1


class ModelError(IceformerError):
    """A model is missing, unknown, not GGUF, or cannot be downloaded."""

    exit_code = 2


class BuildError(IceformerError):
    """Fetching, verifying, patching or compiling llama.cpp failed."""

    exit_code = 3


class BackendError(IceformerError):
    """The chosen llama.cpp libraries are missing or clash with ones already loaded."""

    exit_code = 4


class UsageError(IceformerError):
    """A bad argument value (context size, token count, prompt too long...)."""

    exit_code = 2
