"""The only package that imports `pkcs11`: token sessions, key objects, mechanisms.

Everything above this layer talks in labels, bytes and `hsm.errors` exceptions, so that a
production PKCS#11 module can replace SoftHSM2 without touching the service.
"""
from keysvc.hsm.errors import HsmError, HsmKeyNotFound, HsmOperationFailed, HsmUnavailable
from keysvc.hsm.token import Token, TokenConfig

__all__ = ["HsmError", "HsmKeyNotFound", "HsmOperationFailed", "HsmUnavailable",
           "Token", "TokenConfig"]
