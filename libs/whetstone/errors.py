"""The one exception hierarchy of Whetstone.

Services raise these; only the gateway maps them to HTTP statuses and Tinker error bodies, and
workers turn them into failed futures. ``category`` is the Tinker failure category a client sees:
``user`` for anything the caller can fix, ``server`` for our faults.
"""

from __future__ import annotations

from typing import Literal

Category = Literal["user", "server", "unknown"]


class WhetstoneError(Exception):
    """Base class. ``category`` says whose fault it is; ``http_status`` what a submission gets."""

    category: Category = "server"
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UserError(WhetstoneError):
    """Bad input: wrong shapes, tokens outside the vocabulary, a missing loss input, ..."""

    category: Category = "user"
    http_status = 400


class UnknownModel(UserError):
    """A base model that the registry does not serve."""


class NotFound(UserError):
    """A run, session, checkpoint or future that does not exist for this tenant.

    Another tenant's objects are reported as missing, never as forbidden, so that ids leak nothing.
    """

    http_status = 404


class Unauthorized(UserError):
    """A missing, malformed or revoked API key."""

    http_status = 401


class Conflict(UserError):
    """A name that is already taken (e.g. a checkpoint saved twice without ``overwrite``)."""


class Unavailable(WhetstoneError):
    """A dependency (bus, worker) cannot be reached right now; the client should retry."""

    http_status = 503


class RateLimited(WhetstoneError):
    """A tenant over one of its quotas (concurrent runs, in-flight requests): HTTP 429 with
    ``Retry-After``, which the SDK retries with the same request (and seq_id). Not a
    ``UserError`` on purpose: a refused training request's seq_id is filled with a ``Skip``, and
    this one's must not be, since the same seq_id comes back."""

    category: Category = "user"
    http_status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
