"""Exception and warning hierarchy of dnmf.

Every error raised on purpose by dnmf derives from :class:`DnmfError`; errors about
user input also derive from :class:`ValueError` so generic handlers keep working.
"""

from __future__ import annotations

__all__ = ["DnmfError", "InputError", "ConfigError", "WorkerLostError", "CheckpointError", "ConvergenceWarning"]


class DnmfError(Exception):
    """Base class of all dnmf errors."""


class InputError(DnmfError, ValueError):
    """The data or a parameter given to a dnmf function is invalid."""


class ConfigError(DnmfError, ValueError):
    """A job configuration (YAML) is invalid; the message names the key path."""


class WorkerLostError(DnmfError):
    """A Dask worker was lost (or stopped answering) and the computation could not recover.

    Raised by the distributed executor's verbs in place of the many ways ``distributed`` reports
    a lost worker (closed comms, cancelled or lost futures, ``KilledWorker``, timeouts), so
    algorithms catch this one type. ``worker`` is the lost worker's address when known.
    """

    def __init__(self, message: str, worker: str | None = None):
        super().__init__(message)
        self.worker = worker


class CheckpointError(DnmfError):
    """A checkpoint (or another Zarr store dnmf wrote) is damaged: missing, unreadable or altered data.

    Attributes
    ----------
    path : str
        The damaged store or group.
    problems : dict
        ``{part: what is wrong}`` (e.g. ``{"slot0": "chunk missing in 'w'"}``).
    """

    def __init__(self, message: str, path: str = "", problems: dict | None = None):
        super().__init__(message)
        self.path = path
        self.problems = dict(problems or {})


class ConvergenceWarning(UserWarning):
    """A fit stopped at its iteration cap before meeting its tolerance."""
