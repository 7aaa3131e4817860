"""Exception and warning hierarchy of dnmf.

Every error raised on purpose by dnmf derives from :class:`DnmfError`; errors about
user input also derive from :class:`ValueError` so generic handlers keep working.
"""

from __future__ import annotations

__all__ = ["DnmfError", "InputError", "ConfigError", "ConvergenceWarning"]


class DnmfError(Exception):
    """Base class of all dnmf errors."""


class InputError(DnmfError, ValueError):
    """The data or a parameter given to a dnmf function is invalid."""


class ConfigError(DnmfError, ValueError):
    """A job configuration (YAML) is invalid; the message names the key path."""


class ConvergenceWarning(UserWarning):
    """A fit stopped at its iteration cap before meeting its tolerance."""
