"""Three kinds of HSM failure, because callers react to exactly three things.

Unavailable: the token or session is gone (retry later, report UNAVAILABLE).
KeyNotFound: no object with that label. OperationFailed: the mechanism refused the input
(wrong key, failed integrity check, bad GCM tag): the caller's data is bad, not the HSM.
"""
from __future__ import annotations

import pkcs11.exceptions as px


class HsmError(Exception):
    pass


class HsmUnavailable(HsmError):
    pass


class HsmKeyNotFound(HsmError):
    pass


class HsmOperationFailed(HsmError):
    pass


# Return codes that mean the session or token is unusable, not that the input was bad.
BROKEN_SESSION = (
    px.SessionClosed, px.SessionHandleInvalid, px.DeviceRemoved, px.TokenNotPresent,
    px.DeviceError, px.DeviceMemory, px.UserNotLoggedIn, px.TokenNotRecognised,
    px.SessionCount, px.HostMemory, px.NoSuchToken,
)


def translate(exc: BaseException) -> HsmError:
    """Map a python-pkcs11 exception to ours, keeping only its class name (never data)."""
    if isinstance(exc, HsmError):
        return exc
    if isinstance(exc, BROKEN_SESSION):
        return HsmUnavailable(f"token unusable ({type(exc).__name__})")
    if isinstance(exc, px.NoSuchKey):
        return HsmKeyNotFound("no such key object")
    return HsmOperationFailed(f"mechanism failed ({type(exc).__name__})")
