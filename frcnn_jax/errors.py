"""Errors a user can fix: a config value, a path, a damaged file, a busy or changed workdir.

Each is a `UserError` whose message names the problem (the field, the file, the value) and what
to do; the commands (`frcnn_jax.cli.run`) print it as one line, `error: ...`, and exit 1 with no
traceback. Any other exception is a programming error and keeps its traceback. Each class also
derives from the built-in error a caller would catch (ValueError, FileNotFoundError, ...).
"""


class UserError(Exception):
    """An error whose message tells the user what to fix."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the field (`config.a.b`)."""


class MissingFile(UserError, FileNotFoundError):
    """A file or directory the config or a flag names does not exist or holds nothing usable."""


class DamagedFile(UserError, ValueError):
    """A file that is not what it claims to be: a checksum that does not match (the files
    frcnn_jax writes carry one), a format that does not parse; the message names the file."""
