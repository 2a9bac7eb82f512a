"""Webhook signatures for receivers: ``from inferq.signing import InvalidSignature, verify``.

The implementation lives in :mod:`core.signing`; this is the import path the documentation
gives webhook receivers, kept stable.
"""

from core.signing import (
    DEFAULT_TOLERANCE_S,
    SECRET_PREFIX,
    InvalidSignature,
    headers,
    new_secret,
    secret_hint,
    sign,
    verify,
)

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "SECRET_PREFIX",
    "InvalidSignature",
    "headers",
    "new_secret",
    "secret_hint",
    "sign",
    "verify",
]
