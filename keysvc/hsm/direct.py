"""The per-key hot loops' PKCS#11 calls, made on the module's own function list.

Why not python-pkcs11 here: for every object it creates, unwraps or copies, python-pkcs11
0.10.1 builds a Python class from ten attributes. It asks for them in one
C_GetAttributeValue that includes the PKCS#11 3.2 CKA_ENCAPSULATE/CKA_DECAPSULATE; a 2.40
token (SoftHSM2 2.6) refuses that read, and python-pkcs11 then asks ten more times, one
attribute at a time. That is eleven extra calls per device key where the loop needs one:
two thirds of the loop's time on SoftHSM2, and eleven network round trips per key on a
network HSM. The loops need no Python wrapper around each key, only its handle, so these
few calls (C_CreateObject, C_UnwrapKey, C_SignInit + C_Sign, C_WrapKey, C_DestroyObject)
go straight to the module python-pkcs11 has loaded and initialised, on sessions and key
handles python-pkcs11 opened. Callers hold the module's lock, as for any other call.

Return codes become the same exceptions as python-pkcs11's: a broken session raises its
python-pkcs11 class (so `Token.session` retires the session and marks the token down),
anything else HsmOperationFailed with the code (never data).
"""
from __future__ import annotations

import ctypes as C
from typing import Any, Mapping

import pkcs11.exceptions as px

from keysvc.hsm.errors import HsmOperationFailed

CK_ULONG = C.c_ulong
CK_BBOOL = C.c_ubyte
CKR_OK = 0
CKR_BUFFER_TOO_SMALL = 0x150
CKR_OBJECT_HANDLE_INVALID = 0x082


class CK_ATTRIBUTE(C.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", C.c_void_p), ("ulValueLen", CK_ULONG)]


class CK_MECHANISM(C.Structure):
    _fields_ = [("mechanism", CK_ULONG), ("pParameter", C.c_void_p),
                ("ulParameterLen", CK_ULONG)]


class _CK_VERSION(C.Structure):
    _fields_ = [("major", C.c_ubyte), ("minor", C.c_ubyte)]


# CK_FUNCTION_LIST (PKCS#11 2.x; a 3.x module returns this layout from C_GetFunctionList).
_FUNCTIONS = (
    "C_Initialize C_Finalize C_GetInfo C_GetFunctionList C_GetSlotList C_GetSlotInfo "
    "C_GetTokenInfo C_GetMechanismList C_GetMechanismInfo C_InitToken C_InitPIN C_SetPIN "
    "C_OpenSession C_CloseSession C_CloseAllSessions C_GetSessionInfo C_GetOperationState "
    "C_SetOperationState C_Login C_Logout C_CreateObject C_CopyObject C_DestroyObject "
    "C_GetObjectSize C_GetAttributeValue C_SetAttributeValue C_FindObjectsInit "
    "C_FindObjects C_FindObjectsFinal C_EncryptInit C_Encrypt C_EncryptUpdate "
    "C_EncryptFinal C_DecryptInit C_Decrypt C_DecryptUpdate C_DecryptFinal C_DigestInit "
    "C_Digest C_DigestUpdate C_DigestKey C_DigestFinal C_SignInit C_Sign C_SignUpdate "
    "C_SignFinal C_SignRecoverInit C_SignRecover C_VerifyInit C_Verify C_VerifyUpdate "
    "C_VerifyFinal C_VerifyRecoverInit C_VerifyRecover C_DigestEncryptUpdate "
    "C_DecryptDigestUpdate C_SignEncryptUpdate C_DecryptVerifyUpdate C_GenerateKey "
    "C_GenerateKeyPair C_WrapKey C_UnwrapKey C_DeriveKey C_SeedRandom C_GenerateRandom "
    "C_GetFunctionStatus C_CancelFunction C_WaitForSlotEvent").split()


class _CK_FUNCTION_LIST(C.Structure):
    _fields_ = [("version", _CK_VERSION)] + [(name, C.c_void_p) for name in _FUNCTIONS]


_P = C.POINTER
_ULONG_P = _P(CK_ULONG)
_RV = CK_ULONG

# Return codes that mean the session or token is gone, as python-pkcs11 names them
# (hsm.errors.BROKEN_SESSION lists the same classes).
_BROKEN = {
    0x002: px.HostMemory, 0x030: px.DeviceError, 0x031: px.DeviceMemory,
    0x032: px.DeviceRemoved, 0x0B0: px.SessionClosed, 0x0B1: px.SessionCount,
    0x0B3: px.SessionHandleInvalid, 0x0E0: px.TokenNotPresent, 0x0E1: px.TokenNotRecognised,
    0x101: px.UserNotLoggedIn,
}


def _check(rv: int) -> None:
    if rv != CKR_OK:
        broken = _BROKEN.get(rv)
        if broken is not None:
            raise broken()
        raise HsmOperationFailed(f"mechanism failed (CKR 0x{rv:X})")


class Template:
    """A CK_ATTRIBUTE array built once per usage; each call copies it and, for
    C_CreateObject, fills in its last entry, CKA_VALUE."""

    def __init__(self, attributes: Mapping[int, Any], value_type: int | None = None) -> None:
        self._keep: list[Any] = []  # the buffers the array points at
        items = list(attributes.items())
        self.count = len(items) + (value_type is not None)
        self.array = (CK_ATTRIBUTE * self.count)()
        for slot, (kind, value) in zip(self.array, items):
            buf = _encode(value)
            self._keep.append(buf)
            slot.type, slot.pValue, slot.ulValueLen = int(kind), C.addressof(buf), C.sizeof(buf)
        if value_type is not None:
            self.array[self.count - 1].type = value_type

    def with_value(self, buf: C.Array) -> C.Array:
        array = (CK_ATTRIBUTE * self.count).from_buffer_copy(self.array)
        array[self.count - 1].pValue, array[self.count - 1].ulValueLen = \
            C.addressof(buf), len(buf)
        return array


def _encode(value: Any) -> C._CData:
    if isinstance(value, bool):
        return CK_BBOOL(value)
    if isinstance(value, int):  # also the IntEnums: CKO_*, CKK_*
        return CK_ULONG(value)
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return C.create_string_buffer(value, len(value))
    raise TypeError(f"no PKCS#11 encoding for {type(value).__name__}")


def _output(call, size: int = 128) -> bytes:
    """A call with an output buffer. Told CKR_BUFFER_TOO_SMALL, it is called again with the
    length the token asked for: the operation is still active, as PKCS#11 says."""
    n = CK_ULONG(size)
    out = C.create_string_buffer(size)
    rv = call(out, C.byref(n))
    if rv == CKR_BUFFER_TOO_SMALL:
        out = C.create_string_buffer(n.value)
        rv = call(out, C.byref(n))
    _check(rv)
    return out.raw[:n.value]


class Calls:
    """The function list of one loaded module."""

    def __init__(self, module_path: str) -> None:
        # The same file python-pkcs11 has loaded: dlopen returns that same instance.
        lib = C.CDLL(module_path)
        lib.C_GetFunctionList.restype = _RV
        lib.C_GetFunctionList.argtypes = [_P(_P(_CK_FUNCTION_LIST))]
        fl = _P(_CK_FUNCTION_LIST)()
        _check(lib.C_GetFunctionList(C.byref(fl)))
        f = fl.contents
        self._lib = lib  # keeps the library loaded as long as these pointers live
        self._create = C.CFUNCTYPE(_RV, CK_ULONG, _P(CK_ATTRIBUTE), CK_ULONG, _ULONG_P)(
            f.C_CreateObject)
        self._destroy = C.CFUNCTYPE(_RV, CK_ULONG, CK_ULONG)(f.C_DestroyObject)
        self._sign_init = C.CFUNCTYPE(_RV, CK_ULONG, _P(CK_MECHANISM), CK_ULONG)(f.C_SignInit)
        self._sign = C.CFUNCTYPE(_RV, CK_ULONG, C.c_char_p, CK_ULONG, C.c_void_p, _ULONG_P)(
            f.C_Sign)
        self._wrap = C.CFUNCTYPE(_RV, CK_ULONG, _P(CK_MECHANISM), CK_ULONG, CK_ULONG,
                                 C.c_void_p, _ULONG_P)(f.C_WrapKey)
        self._unwrap = C.CFUNCTYPE(_RV, CK_ULONG, _P(CK_MECHANISM), CK_ULONG, C.c_char_p,
                                   CK_ULONG, _P(CK_ATTRIBUTE), CK_ULONG, _ULONG_P)(
            f.C_UnwrapKey)
        self._find_init = C.CFUNCTYPE(_RV, CK_ULONG, _P(CK_ATTRIBUTE), CK_ULONG)(
            f.C_FindObjectsInit)
        self._find = C.CFUNCTYPE(_RV, CK_ULONG, _ULONG_P, CK_ULONG, _ULONG_P)(f.C_FindObjects)
        self._find_final = C.CFUNCTYPE(_RV, CK_ULONG)(f.C_FindObjectsFinal)
        self._get_attribute = C.CFUNCTYPE(_RV, CK_ULONG, CK_ULONG, _P(CK_ATTRIBUTE), CK_ULONG)(
            f.C_GetAttributeValue)
        self._set_attribute = C.CFUNCTYPE(_RV, CK_ULONG, CK_ULONG, _P(CK_ATTRIBUTE), CK_ULONG)(
            f.C_SetAttributeValue)

    def create_object(self, session: int, template: Template, value: bytes | None) -> int:
        """C_CreateObject with `value` as CKA_VALUE (our copy of it is zeroed at once), or
        with `template` alone when it has no value slot."""
        if value is None:
            handle = CK_ULONG()
            _check(self._create(session, template.array, template.count, C.byref(handle)))
            return handle.value
        buf = C.create_string_buffer(value, len(value))
        try:
            handle = CK_ULONG()
            array = template.with_value(buf)
            _check(self._create(session, array, template.count, C.byref(handle)))
            return handle.value
        finally:
            C.memset(buf, 0, len(value))

    def unwrap_key(self, session: int, mechanism: int, unwrapping_key: int, wrapped: bytes,
                   template: Template) -> int:
        handle = CK_ULONG()
        _check(self._unwrap(session, C.byref(CK_MECHANISM(mechanism, None, 0)), unwrapping_key,
                            wrapped, len(wrapped), template.array, template.count,
                            C.byref(handle)))
        return handle.value

    def sign(self, session: int, mechanism: int, key: int, data: bytes) -> bytes:
        _check(self._sign_init(session, C.byref(CK_MECHANISM(mechanism, None, 0)), key))
        return _output(lambda out, n: self._sign(session, data, len(data), out, n))

    def wrap_key(self, session: int, mechanism: int, wrapping_key: int, key: int) -> bytes:
        mech = CK_MECHANISM(mechanism, None, 0)
        return _output(lambda out, n: self._wrap(session, C.byref(mech), wrapping_key, key,
                                                 out, n))

    def destroy_object(self, session: int, handle: int) -> None:
        _check(self._destroy(session, handle))

    def set_attribute(self, session: int, handle: int, kind: int, value: bytes) -> bool:
        """C_SetAttributeValue of one attribute; False if the object is gone (another
        process destroyed it after this one found it)."""
        buf = C.create_string_buffer(value, len(value))
        attr = CK_ATTRIBUTE(kind, C.addressof(buf), len(value))
        rv = self._set_attribute(session, handle, C.byref(attr), 1)
        if rv == CKR_OBJECT_HANDLE_INVALID:
            return False
        _check(rv)
        return True

    def find_objects(self, session: int, template: Template) -> list[int]:
        """Every handle matching `template`: the token's data objects (audit anchors, the
        roster) are searched on every audit batch, and python-pkcs11 builds a class for
        each object it finds (eleven calls each, see above) where a handle will do."""
        _check(self._find_init(session, template.array, template.count))
        handles: list[int] = []
        try:
            batch = (CK_ULONG * 32)()
            n = CK_ULONG()
            while True:
                _check(self._find(session, batch, 32, C.byref(n)))
                if not n.value:
                    return handles
                handles.extend(batch[:n.value])
        finally:
            self._find_final(session)

    def attribute(self, session: int, handle: int, kind: int) -> bytes | None:
        """One attribute's value; None if the object is gone (another process destroyed it
        after the search found it)."""
        attr = CK_ATTRIBUTE(kind, None, 0)
        rv = self._get_attribute(session, handle, C.byref(attr), 1)
        if rv == CKR_OBJECT_HANDLE_INVALID:
            return None
        _check(rv)
        buf = C.create_string_buffer(attr.ulValueLen)
        attr.pValue, attr.ulValueLen = C.addressof(buf), len(buf)
        rv = self._get_attribute(session, handle, C.byref(attr), 1)
        if rv == CKR_OBJECT_HANDLE_INVALID:
            return None
        _check(rv)
        return buf.raw[:attr.ulValueLen]

