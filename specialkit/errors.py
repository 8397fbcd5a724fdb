"""One error base class for the kit, with the exit code the ``specialkit`` command returns for it.

Every error the kit raises on purpose derives from :class:`SpecialkitError` (and, for code that caught them
before, from ``ValueError`` or ``RuntimeError`` as it always did). Its message names the problem and the fix;
the command prints it as one line and exits with :meth:`SpecialkitError.exit_code`:

* ``2`` (:data:`BAD_INPUT`): a setting, file or argument is wrong, or a stage a number needs is not made yet;
* ``1`` (:data:`ENVIRONMENT`): the file system refused (full, read-only, permission denied) — the error's
  cause is an ``OSError`` — or another process holds the run's lock.

This module imports nothing of the kit, so every module can use it.
"""

from __future__ import annotations

__all__ = [
    "SpecialkitError",
    "ConfigError",
    "MissingStageError",
    "StudyError",
    "BAD_INPUT",
    "ENVIRONMENT",
    "exit_code_of",
]

BAD_INPUT = 2
"""Exit code of bad input: a setting, a file's contents, an argument, a stage not made yet."""
ENVIRONMENT = 1
"""Exit code of an environment that refused: the file system, a lock held by another process."""


class SpecialkitError(Exception):
    """Base of every error the kit raises on purpose; the message names the problem and the fix."""

    code: int = BAD_INPUT
    """The exit code of the ``specialkit`` command for this error (a subclass may set another)."""

    def exit_code(self) -> int:
        """The command's exit code: :data:`ENVIRONMENT` when an ``OSError`` caused this error, else :attr:`code`.

        Returns:
            1 or 2 (see the module's docstring).
        """
        return ENVIRONMENT if isinstance(self.__cause__, OSError) else self.code


class ConfigError(SpecialkitError, ValueError):
    """A configuration key is unknown or its value impossible; the message names the key and the fix."""


class MissingStageError(SpecialkitError, RuntimeError):
    """A number was asked of a run whose stage is not finished; the message names the stage and the command that
    makes it (the CLI prints it as one line, exit code 2)."""


class StudyError(ConfigError):
    """A study definition is impossible (unknown key, rejected value, empty grid, another study in the folder)."""


def exit_code_of(err: BaseException) -> int:
    """The ``specialkit`` command's exit code for ``err``.

    Args:
        err: an exception that reached the command.

    Returns:
        :meth:`SpecialkitError.exit_code` for the kit's errors; for a plain ``ValueError``/``IndexError`` 1 when an
        ``OSError`` caused it, else 2 (what the command returned before the base class existed).
    """
    if isinstance(err, SpecialkitError):
        return err.exit_code()
    return ENVIRONMENT if isinstance(err.__cause__, OSError) else BAD_INPUT
