"""Key objects and the mechanisms keysvc uses, as plain functions over a pooled session.

Every secret key made here is sensitive; persistent keys are also non-extractable. Session
objects (store=False) die with the session or on `destroy`, which callers do in `finally`.
"""
from __future__ import annotations

import ctypes
import enum
import functools
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Concatenate, ContextManager, ParamSpec, TypeVar

import pkcs11.exceptions as px
from pkcs11 import MGF, Attribute, GCMParams, KeyType, Mechanism, ObjectClass
from pkcs11._pkcs11 import SearchIter  # type: ignore[attr-defined]
from pkcs11.util.rsa import encode_rsa_public_key

from keysvc.hsm.direct import Template
from keysvc.hsm.errors import BROKEN_SESSION, HsmKeyNotFound, HsmOperationFailed, translate
from keysvc.hsm.token import Session

A = Attribute
P = ParamSpec("P")
R = TypeVar("R")


# Every function below that searches the token's objects or reads their attributes holds
# the token's store lock shared, and every one that writes a token object holds it
# exclusively (keysvc/hsm/store_lock.py says why: SoftHSM2 2.6.1's file store lets one
# process's search spoil another's write). Using a key, and session objects, need neither.
def _holding(exclusive: bool) -> Callable[[Callable[Concatenate[Session, P], R]],
                                          Callable[Concatenate[Session, P], R]]:
    def decorate(fn: Callable[Concatenate[Session, P], R]) -> Callable[Concatenate[Session, P], R]:
        @functools.wraps(fn)
        def held(s: Session, *args: P.args, **kwargs: P.kwargs) -> R:
            with s.store.exclusive() if exclusive else s.store.shared():
                return fn(s, *args, **kwargs)
        return held
    return decorate


_reads, _writes = _holding(exclusive=False), _holding(exclusive=True)


def _writes_if(s: Session, token: bool) -> ContextManager[None]:
    return s.store.exclusive() if token else nullcontext()


class Unwrap(enum.Enum):
    """How a wrapped key is carried: the two key transports of the crypto profile."""

    AES_KW = "kw"          # RFC 3394 under an AES-256 key
    AES_KW_PAD = "kwp"     # RFC 5649
    RSA_OAEP_SHA1 = "oaep"  # OAEP, SHA-1, MGF1-SHA-1, no label


class Kcv(enum.Enum):
    CMAC = "CMAC"
    ECB = "ECB"


def _fail(exc: Exception) -> Exception:
    """Translate a mechanism failure; a broken-session code is left as it is, so that
    `Token.session` sees it, retires the session and reports HsmUnavailable."""
    if isinstance(exc, BROKEN_SESSION):
        return exc
    return translate(exc)


# --------------------------------------------------------------------------- lookup
# Private objects only: a session that never logged in (anyone who can reach the token
# through its module: a process holding another partition's PIN, a tool) can still make
# *public* token objects, and one labelled like ours must never be taken for ours (a public
# `storage-key@v9` of known value would become the primary storage key; a public roster
# would enrol officers). keysvc makes every secret and private key and data object private.
PRIVATE_ONLY = {A.PRIVATE: True}


def find_key(s: Session, label: str, cls: ObjectClass = ObjectClass.SECRET_KEY) -> Any:
    """The persistent object with this label, cached per session (a secret or private key:
    private objects only; a public key is public by nature)."""
    cache_key = (label, cls)
    key = s.keys.get(cache_key)
    if key is None:
        template = {A.CLASS: cls, A.LABEL: label}
        if cls != ObjectClass.PUBLIC_KEY:
            template.update(PRIVATE_ONLY)
        try:
            found = objects(s, template)
        except px.PKCS11Error as exc:
            raise _fail(exc) from None
        if len(found) != 1:
            raise HsmKeyNotFound(f"no single key object labelled {label!r}")
        key = s.keys[cache_key] = found[0]
    return key


def session_copy(s: Session, label: str, cls: ObjectClass = ObjectClass.SECRET_KEY) -> Any:
    """A session copy (C_CopyObject) of a token key, for a loop of many operations.

    SoftHSM2 decrypts a private token object's value on every use; a session copy skips
    that (about a quarter of a wrap loop's time here). The copy stays sensitive and
    non-extractable inside the token and dies with the session: use it only in a session
    that is retired after the loop (`Session.retire_after_use`). It is labelled
    `copy:<label>`: session objects are visible to every session of the process, and a copy
    under the key's own label would make another thread's search by label find two.
    """
    if not s.retire:
        raise ValueError("session copies belong in a session retired after use")
    cache_key = (label, cls, "copy")
    copy = s.keys.get(cache_key)
    if copy is None:  # (a copy already made takes no lock: loops ask once per key)
        copy = s.keys[cache_key] = _copy_of(s, label, cls)
    return copy


@_reads
def _copy_of(s: Session, label: str, cls: ObjectClass) -> Any:
    try:
        return find_key(s, label, cls).copy({A.TOKEN: False, A.LABEL: f"copy:{label}"})
    except px.PKCS11Error as exc:
        raise _fail(exc) from None


def find_private_key(s: Session, label: str) -> Any:
    return find_key(s, label, ObjectClass.PRIVATE_KEY)


def has_key(s: Session, label: str, cls: ObjectClass = ObjectClass.SECRET_KEY) -> bool:
    try:
        find_key(s, label, cls)
        return True
    except HsmKeyNotFound:
        return False


def forget(s: Session, label: str) -> None:
    for k in [k for k in s.keys if k[0] == label]:
        del s.keys[k]


@_writes
def destroy_objects(s: Session, label: str) -> int:
    """Destroy every object (secret, private, public) with this label."""
    n = 0
    for obj in objects(s, {A.LABEL: label}):
        obj.destroy()
        n += 1
    forget(s, label)
    return n


# --------------------------------------------------------------------------- data objects
@_writes
def put_data(s: Session, label: str, value: bytes) -> None:
    """A private, unmodifiable token data object: state the database's writers cannot
    change or roll back (they can neither log in to the token nor restore it).

    Made by a direct C_CreateObject: python-pkcs11 reads the new object's attributes back,
    and when another process changed the token meanwhile, SoftHSM2 may already call the
    new handle invalid (the object itself is made)."""
    template = Template({A.CLASS: ObjectClass.DATA, A.TOKEN: True, A.PRIVATE: True,
                         A.MODIFIABLE: False, A.LABEL: label}, value_type=A.VALUE)
    s.direct.create_object(s.raw.handle, template, value)


# Another process using the same token (a replica, a tool) may destroy a data object
# between this search finding it and its value being read or it being destroyed here: that
# object is gone, exactly as if the search had run a moment later, and is skipped.
_GONE = (px.ObjectHandleInvalid,)


@_reads
def objects(s: Session, template: dict) -> list:
    """The objects matching `template`, as python-pkcs11 objects (key ceremonies and the
    start-up reconciliation; data objects go by direct calls, `_data`). Found one at a time:
    when another process destroys an object between C_FindObjects finding it and its class
    being read, python-pkcs11 ends the whole search with ObjectHandleInvalid (the workers of
    one server share the tokens, keysvc/processes.py). That object is skipped instead."""
    found = []
    with SearchIter(s.raw, template, 1) as search:
        for one in search:
            try:
                found.extend(one)
            except _GONE:
                continue
    return found


def _data_handles(s: Session, label: str | None) -> list[int]:
    attrs: dict = {A.CLASS: ObjectClass.DATA, A.TOKEN: True, **PRIVATE_ONLY}
    if label is not None:
        attrs[A.LABEL] = label
    return s.direct.find_objects(s.raw.handle, Template(attrs))


@_reads
def _data(s: Session, label: str) -> list[tuple[int, bytes]]:
    """(handle, value) of each data object with this label, by direct calls (keysvc/hsm/direct.py:
    python-pkcs11 would build a class for each, and the audit writer searches the anchors on
    every batch). One destroyed by another process after the search is skipped: it is gone,
    exactly as if the search had run a moment later."""
    out = []
    for h in _data_handles(s, label):
        value = s.direct.attribute(s.raw.handle, h, A.VALUE)
        if value is not None:
            out.append((h, value))
    return out


def data_values(s: Session, label: str) -> list[bytes]:
    """The values of the data objects with this label, found afresh (never cached)."""
    return [v for _, v in _data(s, label)]


@_reads
def data_by_label(s: Session, prefix: str) -> dict[str, list[bytes]]:
    """Every data object whose label starts with `prefix`: label -> values, one search."""
    out: dict[str, list[bytes]] = {}
    for h in _data_handles(s, None):
        label = s.direct.attribute(s.raw.handle, h, A.LABEL)
        if label is None or not label.decode(errors="replace").startswith(prefix):
            continue
        value = s.direct.attribute(s.raw.handle, h, A.VALUE)
        if value is not None:
            out.setdefault(label.decode(errors="replace"), []).append(value)
    return out


@_writes
def destroy_data(s: Session, label: str, doomed: Callable[[bytes], bool] = lambda v: True
                 ) -> None:
    """Destroy the data objects with this label whose value is `doomed`."""
    for h, value in _data(s, label):
        if doomed(value):
            try:
                s.direct.destroy_object(s.raw.handle, h)
            except HsmOperationFailed:
                # Another process destroyed it first: SoftHSM2 then answers
                # CKR_OBJECT_HANDLE_INVALID or, if it had the object's file open,
                # CKR_FUNCTION_FAILED. Gone is what was wanted; still there is an error.
                if value in data_values(s, label):
                    raise


# ------------------------------------------------------------------ moving data objects
@_writes
def put_moving(s: Session, application: str, label: str) -> int:
    """A private token data object whose label alone changes afterwards (`move`); found by
    its CKA_APPLICATION, which is fixed at creation. For state written very often (the
    audit anchor, after every batch): SoftHSM2 rewrites one object file for a changed
    label (0.16 ms here), where creating an object costs 2 ms and a re-index of the token
    in every process, and the whole HSM waits for either."""
    template = Template({A.CLASS: ObjectClass.DATA, A.TOKEN: True, A.PRIVATE: True,
                         A.MODIFIABLE: True, A.APPLICATION: application, A.LABEL: label})
    return s.direct.create_object(s.raw.handle, template, None)


@_reads
def moving(s: Session, application: str) -> list[tuple[int, bytes]]:
    """(handle, label) of each moving data object of this application, found afresh. One
    destroyed by another process after the search is skipped (see `_data`)."""
    template = Template({A.CLASS: ObjectClass.DATA, A.TOKEN: True, A.PRIVATE: True,
                         A.APPLICATION: application})
    out = []
    for h in s.direct.find_objects(s.raw.handle, template):
        label = s.direct.attribute(s.raw.handle, h, A.LABEL)
        if label is not None:
            out.append((h, label))
    return out


@_reads
def moving_label(s: Session, handle: int, application: str) -> bytes | None:
    """The label of the moving object kept at `handle`, or None when that handle is gone or
    now names something else: a kept handle is checked before it is moved, because a
    handle outlives its object (another process may destroy it) and names only what this
    process's module instance says it names."""
    kind = s.direct.attribute(s.raw.handle, handle, A.CLASS)
    if kind is None or int.from_bytes(kind, sys.byteorder) != ObjectClass.DATA:
        return None
    if s.direct.attribute(s.raw.handle, handle, A.APPLICATION) != application.encode():
        return None
    return s.direct.attribute(s.raw.handle, handle, A.LABEL)


@_writes
def move(s: Session, handle: int, label: str) -> bool:
    """Set the moving object's label; False when it is gone (another process destroyed it:
    SoftHSM2 answers CKR_OBJECT_HANDLE_INVALID, or an error if it had the file open)."""
    try:
        return s.direct.set_attribute(s.raw.handle, handle, A.LABEL, label.encode())
    except HsmOperationFailed:
        return False


@_writes
def destroy_moving(s: Session, handle: int) -> None:
    """Destroy a moving object; one another process destroyed first is gone as wanted."""
    try:
        s.direct.destroy_object(s.raw.handle, handle)
    except HsmOperationFailed:
        if s.direct.attribute(s.raw.handle, handle, A.LABEL) is not None:
            raise


@dataclass(frozen=True)
class ObjectFacts:
    """What a key record is cross-checked against: the token object's own attributes."""

    key_id: str
    usage: dict  # Attribute -> bool, for the attributes the record's purpose fixes


@_reads
def object_facts(s: Session, label: str, cls: ObjectClass, usage: dict) -> ObjectFacts:
    """CKA_ID and the usage flags named in `usage` of the one object with this label."""
    key = find_key(s, label, cls)
    try:
        got = {a: bool(key[a]) for a in usage}
        return ObjectFacts(bytes(key[A.ID] or b"").decode(errors="replace"), got)
    except px.PKCS11Error as exc:
        raise _fail(exc) from None


@_reads
def objects_with_ids(s: Session) -> list[tuple[str, ObjectClass, str]]:
    """(label, class, CKA_ID) of every key object in the token, for reconciliation."""
    out = []
    for cls in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        for o in objects(s, {A.CLASS: cls}):
            out.append((o[A.LABEL] or "", cls, bytes(o[A.ID] or b"").decode(errors="replace")))
    return out


@_writes
def destroy_with_id(s: Session, label: str, key_id: str) -> int:
    """Destroy every key object with this label whose CKA_ID is `key_id`."""
    n = 0
    for obj in objects(s, {A.LABEL: label, A.ID: key_id.encode()}):
        if obj[A.CLASS] == ObjectClass.DATA:
            continue
        obj.destroy()
        n += 1
    forget(s, label)
    return n


@_writes
def set_id(s: Session, label: str, key_id: str) -> int:
    """Give every key object with this label the CKA_ID `key_id` (upgrade of objects made
    before key ids existed)."""
    n = 0
    for obj in objects(s, {A.LABEL: label}):
        if obj[A.CLASS] == ObjectClass.DATA:
            continue
        obj[A.ID] = key_id.encode()
        n += 1
    forget(s, label)
    return n


@_reads
def key_attributes(s: Session, label: str) -> dict[str, bool]:
    key = find_key(s, label)
    return {"sensitive": bool(key[A.SENSITIVE]), "extractable": bool(key[A.EXTRACTABLE])}


# --------------------------------------------------------------------------- templates
def _secret_template(*, token: bool, label: str | None, usage: dict, key_id: str = "",
                     custody: bool = False) -> dict:
    # No keysvc key derives: said explicitly, since a vendor's default may differ.
    t = {A.TOKEN: token, A.SENSITIVE: True, A.EXTRACTABLE: not token,
         A.PRIVATE: True, A.DERIVE: False, **usage}
    if custody:
        t.update(CUSTODY)
    if label:
        t[A.LABEL] = label
    if key_id:
        t[A.ID] = key_id.encode()
    return t


# Key usage is the policy. A key that may ENCRYPT/DECRYPT can run AES-ECB over a wrapped
# blob and so undo RFC 3394 by hand; a key that may WRAP can carry any extractable session
# object out to whoever knows it. So: transport keys only unwrap (their bits are known to
# the originator), storage keys only wrap and unwrap, export keys only wrap, and the one
# key that encrypts data (officers' pending components) does nothing else.
KEK_USAGE = {A.WRAP: False, A.UNWRAP: True, A.ENCRYPT: False, A.DECRYPT: False,
             A.SIGN: False, A.VERIFY: False}
EXPORT_USAGE = {A.WRAP: True, A.UNWRAP: False, A.ENCRYPT: False, A.DECRYPT: False,
                A.SIGN: False, A.VERIFY: False}
STORAGE_USAGE = {A.WRAP: True, A.UNWRAP: True, A.ENCRYPT: False, A.DECRYPT: False,
                 A.SIGN: False, A.VERIFY: False}
SEAL_USAGE = {A.WRAP: False, A.UNWRAP: False, A.ENCRYPT: True, A.DECRYPT: True,
              A.SIGN: False, A.VERIFY: False}
# A session copy of a key while its check value is computed (CMAC signs, ECB encrypts);
# never persisted. Nothing may decrypt with it, wrap or unwrap under it.
KCV_USAGE = {A.SIGN: True, A.ENCRYPT: True, A.WRAP: False, A.UNWRAP: False,
             A.DECRYPT: False, A.VERIFY: False}
CONTENT_USAGE = {A.DECRYPT: True, A.ENCRYPT: False, A.WRAP: False, A.UNWRAP: False}
DEVICE_USAGE = KCV_USAGE  # a device or master key object is only check-valued and wrapped
# Device keys read from decrypted group information: their bits are already in this
# process (the plaintext), so the session object need not be CKA_PRIVATE; SoftHSM2 keeps
# private objects encrypted in memory, which costs a fifth of the wrap loop and protects
# nothing here. Master keys keep DEVICE_USAGE: they never enter this process.
PLAINTEXT_KEY_USAGE = {**DEVICE_USAGE, A.PRIVATE: False}
MAC_USAGE = {A.SIGN: True, A.VERIFY: True}


# A long-lived key (storage, seal, MAC) can leave the token only wrapped by a key marked
# CKA_TRUSTED, and only the token's security officer can mark one so (PKCS#11 2.40, 4.4):
# that is the backup ceremony's key (keysvc/custody/backup.py). Neither attribute can be
# turned back once set (SoftHSM2 answers CKR_ATTRIBUTE_READ_ONLY), and a key holding the
# user PIN cannot wrap it: measured in tests/test_custody.py.
CUSTODY = {A.EXTRACTABLE: True, A.WRAP_WITH_TRUSTED: True}


def long_lived_template(label: str, usage: dict) -> dict:
    """A long-lived token key's attributes (what a restore unwraps it with)."""
    return _secret_template(token=True, label=label, usage=usage, custody=True)


@_writes
def create_trusted_wrapping_key(so: Session, label: str, modulus: int, exponent: int
                                ) -> None:
    """As security officer: an RSA public key that may wrap long-lived keys (CKA_TRUSTED),
    with RSA-OAEP only, never to be changed or copied. Made by a direct call: python-pkcs11
    0.10.1 crashes packing CKA_ALLOWED_MECHANISMS (measured: a segmentation fault)."""
    allowed = ctypes.c_ulong(int(Mechanism.RSA_PKCS_OAEP))  # a CK_ULONG array of one
    template = Template({A.CLASS: ObjectClass.PUBLIC_KEY, A.KEY_TYPE: KeyType.RSA,
                         A.TOKEN: True, A.PRIVATE: False, A.LABEL: label,
                         A.PUBLIC_EXPONENT: _int_bytes(exponent), A.TRUSTED: True,
                         A.WRAP: True,
                         A.ENCRYPT: False, A.VERIFY: False, A.DERIVE: False,
                         A.MODIFIABLE: False, A.COPYABLE: False,
                         A.ALLOWED_MECHANISMS: bytes(allowed)}, value_type=A.MODULUS)
    try:
        so.direct.create_object(so.raw.handle, template, _int_bytes(modulus))
    except HsmOperationFailed:
        raise
    except px.PKCS11Error as exc:
        raise _fail(exc) from None


# --------------------------------------------------------------------------- custody
# The backup ceremony's key operations (keysvc/custody/backup.py): RSA-OAEP with SHA-1, the
# OAEP this token does (SoftHSM2 2.6.1 refuses SHA-256), under a one-time RSA pair.
OAEP_SHA1 = (Mechanism.SHA_1, MGF.SHA1, None)


def _int_bytes(v: int) -> bytes:
    return v.to_bytes((v.bit_length() + 7) // 8, "big")


@_reads
def trusted_wrapping_key(s: Session, label: str, modulus: int, exponent: int) -> Any:
    """The public key with this label, only if it is the one expected and marked trusted
    (a host-file writer could put another object under the label); else HsmKeyNotFound."""
    key = find_key(s, label, ObjectClass.PUBLIC_KEY)
    try:
        if key[A.TRUSTED] and key[A.MODULUS] == _int_bytes(modulus) \
                and key[A.PUBLIC_EXPONENT] == _int_bytes(exponent):
            return key
    except px.PKCS11Error as exc:
        raise _fail(exc) from None
    raise HsmKeyNotFound(f"{label!r} is not the expected trusted key")


def wrap_oaep(wrapping_key: Any, key: Any) -> bytes:
    """C_WrapKey with RSA-OAEP under a (trusted) public key."""
    try:
        return wrapping_key.wrap_key(key, mechanism=Mechanism.RSA_PKCS_OAEP,
                                     mechanism_param=OAEP_SHA1)
    except px.PKCS11Error as exc:
        raise _fail(exc) from None


def rsa_unwrapping_key(s: Session, private_key: Any) -> Any:
    """An RSA private key (pyca object) as a session object that can only unwrap."""
    try:
        return s.raw.create_object({**_rsa_unwrap_only(private_key), A.TOKEN: False})
    except px.PKCS11Error as exc:
        raise _fail(exc) from None


def unwrap_long_lived(unwrapping_key: Any, wrapped: bytes, label: str, *, aes: bool,
                      usage: dict) -> Any:
    """A long-lived key back into the token under its label (restore), RSA-OAEP; the caller
    holds the store lock exclusively (`Session.store`)."""
    try:
        return unwrapping_key.unwrap_key(
            ObjectClass.SECRET_KEY, KeyType.AES if aes else KeyType.GENERIC_SECRET, wrapped,
            mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_SHA1, label=label,
            store=True, template=long_lived_template(label, usage))
    except px.PKCS11Error as exc:
        raise _fail(exc) from None


def destroy_keys_labelled(s: Session, prefix: str, doomed: Callable[[str], bool]) -> list[str]:
    """Destroy the public and secret key objects whose label starts with `prefix` and is
    `doomed`; returns their labels. The scan shares the store (it runs every minute, and
    usually finds nothing); only a destruction takes it alone, finding its objects afresh."""
    found = []
    for cls in (ObjectClass.PUBLIC_KEY, ObjectClass.SECRET_KEY):
        for obj in objects(s, {A.CLASS: cls}):
            label = obj[A.LABEL] or ""
            if label.startswith(prefix) and doomed(label):
                found.append((cls, label))
    for cls, label in found:
        with s.store.exclusive():
            for obj in objects(s, {A.CLASS: cls, A.LABEL: label}):
                destroy(obj)
        forget(s, label)
    return [label for _, label in found]


# --------------------------------------------------------------------------- generation
@_writes
def generate_aes(s: Session, label: str, *, bits: int = 256, usage: dict | None = None,
                 key_id: str = "") -> None:
    """A persistent AES key made inside the token (storage and component-seal keys), which
    only the backup ceremony can take out (CUSTODY)."""
    s.raw.generate_key(KeyType.AES, bits, label=label, store=True,
                       template=_secret_template(token=True, label=label, key_id=key_id,
                                                 usage=usage or STORAGE_USAGE, custody=True))


@_writes
def generate_hmac(s: Session, label: str, key_id: str = "") -> None:
    s.raw.generate_key(KeyType.GENERIC_SECRET, 256, label=label, store=True,
                       template=_secret_template(token=True, label=label, usage=MAC_USAGE,
                                                 key_id=key_id, custody=True))


@_reads
def secret_key_labels(s: Session) -> list[str]:
    """The label of every secret key object in the token, by direct calls (a handful of
    objects; read on every file call to find the primary storage key version)."""
    out = []
    for h in s.direct.find_objects(s.raw.handle, Template({A.CLASS: ObjectClass.SECRET_KEY,
                                                          A.PRIVATE: True})):
        label = s.direct.attribute(s.raw.handle, h, A.LABEL)
        if label is not None:
            out.append(label.decode(errors="replace"))
    return out


@_reads
def custody_attributes(s: Session, label: str) -> dict[str, bool]:
    """Whether the backup ceremony can take this key out of the token."""
    key = find_key(s, label)
    try:
        return {"extractable": bool(key[A.EXTRACTABLE]),
                "wrap_with_trusted": bool(key[A.WRAP_WITH_TRUSTED])}
    except px.PKCS11Error as exc:
        raise _fail(exc) from None


def generate_rsa(s: Session, label: str, bits: int = 3072, *, key_id: str = "") -> bytes:
    """A persistent RSA pair whose private half can only unwrap (C_UnwrapKey with
    RSA-OAEP): a key that could C_Decrypt would hand the plaintext to this process, so
    the private half is also unmodifiable (no C_SetAttributeValue can give it CKA_DECRYPT).
    `key_id` (CKA_ID) names the operation or import job that made it. Returns the public
    half as SPKI DER.

    Where the token's store is locked (SoftHSM2's file store, store_lock.py), the pair is
    generated as session objects and copied into the token: generating takes 0.3 to
    0.7 s, and only the copies need the store alone (C_CopyObject keeps every attribute,
    CKA_LOCAL and CKA_NEVER_EXTRACTABLE included: tests/test_hsm_store_lock.py). A token
    without that lock gets the pair generated in it at once, as not every HSM copies
    private keys."""
    public = {A.LABEL: label, A.WRAP: True, A.ENCRYPT: True, A.VERIFY: False}
    private = {A.LABEL: label, A.SENSITIVE: True, A.EXTRACTABLE: False, A.PRIVATE: True,
               A.UNWRAP: True, A.DECRYPT: False, A.SIGN: False, A.SIGN_RECOVER: False,
               A.DERIVE: False}
    kid = key_id.encode() or None
    if s.store.path is None:
        pub, _ = s.raw.generate_keypair(
            KeyType.RSA, bits, label=label, store=True, id=kid,
            public_template={A.TOKEN: True, **public},
            private_template={A.TOKEN: True, A.MODIFIABLE: False, **private})
        return public_key_der(pub)
    s.retire_after_use()  # closing the session destroys the session halves, whatever happens
    pub, priv = s.raw.generate_keypair(
        KeyType.RSA, bits, label=label, store=False, id=kid,
        public_template={A.TOKEN: False, **public},
        private_template={A.TOKEN: False, **private})
    try:
        der = public_key_der(pub)
        with s.store.exclusive():
            made = []
            try:
                made.append(pub.copy({A.TOKEN: True}))
                made.append(priv.copy({A.TOKEN: True, A.MODIFIABLE: False}))
            except BaseException:
                for obj in made:  # never half a pair in the token
                    destroy(obj)
                raise
        return der
    finally:  # the session halves, now (a search by label must find the token's only)
        try:
            destroy(pub)
        finally:
            destroy(priv)


def public_key_der(pub: Any) -> bytes:
    """SubjectPublicKeyInfo DER for an RSA public key object."""
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_der_public_key,
    )
    pkcs1 = encode_rsa_public_key(pub)
    from asn1crypto.keys import PublicKeyInfo, RSAPublicKey
    info = PublicKeyInfo({"algorithm": {"algorithm": "rsa"},
                          "public_key": RSAPublicKey.load(pkcs1)})
    return load_der_public_key(info.dump()).public_bytes(Encoding.DER,
                                                         PublicFormat.SubjectPublicKeyInfo)


@_writes
def import_rsa_private(s: Session, label: str, private_key: Any, key_id: str = "") -> None:
    """Load an RSA private key (pyca object) as an unwrap-only token object (tests, migration
    of recipient keys from another HSM's export)."""
    pn = private_key.private_numbers().public_numbers
    s.raw.create_object({**_rsa_unwrap_only(private_key), A.TOKEN: True, A.LABEL: label,
                         A.ID: key_id.encode()})
    s.raw.create_object({
        A.CLASS: ObjectClass.PUBLIC_KEY, A.KEY_TYPE: KeyType.RSA, A.TOKEN: True,
        A.LABEL: label, A.ID: key_id.encode(), A.WRAP: True, A.ENCRYPT: True,
        A.VERIFY: False, A.MODULUS: _int_bytes(pn.n), A.PUBLIC_EXPONENT: _int_bytes(pn.e)})


def _rsa_unwrap_only(private_key: Any) -> dict:
    """An RSA private key (pyca object) as the attributes of an object that can only
    unwrap: sensitive, never extractable, no C_Decrypt, no signing."""
    n = private_key.private_numbers()
    p = n.public_numbers
    return {A.CLASS: ObjectClass.PRIVATE_KEY, A.KEY_TYPE: KeyType.RSA, A.PRIVATE: True,
            A.SENSITIVE: True, A.EXTRACTABLE: False, A.UNWRAP: True, A.DECRYPT: False,
            A.SIGN: False, A.DERIVE: False,
            A.MODULUS: _int_bytes(p.n), A.PUBLIC_EXPONENT: _int_bytes(p.e),
            A.PRIVATE_EXPONENT: _int_bytes(n.d), A.PRIME_1: _int_bytes(n.p),
            A.PRIME_2: _int_bytes(n.q), A.EXPONENT_1: _int_bytes(n.dmp1),
            A.EXPONENT_2: _int_bytes(n.dmq1), A.COEFFICIENT: _int_bytes(n.iqmp)}


# --------------------------------------------------------------------------- hot loops
@dataclass(frozen=True)
class SessionKey:
    """A session key object known by its handle alone: what the per-key loops make, so
    that no Python class is built around each key (keysvc/hsm/direct.py says why). `wrap`,
    `check_value` and `destroy` take it like any other key."""

    session: Session
    handle: int


_TEMPLATES: dict[tuple[int, bool], tuple[dict, Template]] = {}


def _template(usage: dict, with_value: bool) -> Template:
    """One CK_ATTRIBUTE array per usage constant, built on first use."""
    cached = _TEMPLATES.get((id(usage), with_value))
    if cached is None or cached[0] is not usage:
        attrs = {A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES,
                 **_secret_template(token=False, label=None, usage=usage)}
        cached = _TEMPLATES[(id(usage), with_value)] = (
            usage, Template(attrs, value_type=A.VALUE if with_value else None))
    return cached[1]


def create_session_key(s: Session, value: bytes, usage: dict) -> SessionKey:
    """`create_aes` for a loop over many keys: a session object, by handle."""
    return SessionKey(s, s.direct.create_object(s.raw.handle, _template(usage, True), value))


def unwrap_session_key(s: Session, unwrapping_key: Any, wrapped: bytes, how: Unwrap,
                       usage: dict) -> SessionKey:
    """`unwrap` for a loop over many keys (AES key wrap only; an RSA unwrap costs far more
    than python-pkcs11's wrapper around it)."""
    if how is Unwrap.RSA_OAEP_SHA1:
        raise ValueError("RSA-OAEP unwraps go through `unwrap`")
    mech = Mechanism.AES_KEY_WRAP_PAD if how is Unwrap.AES_KW_PAD else Mechanism.AES_KEY_WRAP
    return SessionKey(s, s.direct.unwrap_key(s.raw.handle, mech, unwrapping_key.handle,
                                             wrapped, _template(usage, False)))


# --------------------------------------------------------------------------- import
def create_aes(s: Session, value: bytes, *, token: bool = False, label: str | None = None,
               usage: dict | None = None, key_id: str = "") -> Any:
    """Turn clear key bytes into a key object; the caller drops its copy right after."""
    try:
        with _writes_if(s, token):
            return s.raw.create_object({
                A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES, A.VALUE: value,
                **_secret_template(token=token, label=label, usage=usage or DEVICE_USAGE,
                                   key_id=key_id)})
    except px.PKCS11Error as exc:
        raise _fail(exc) from None


def unwrap(s: Session, unwrapping_key: Any, wrapped: bytes, how: Unwrap, *,
           token: bool = False, label: str | None = None, usage: dict | None = None,
           key_id: str = "") -> Any:
    """C_UnwrapKey into the token: the key bits never reach this process."""
    mech, param = _unwrap_mechanism(how)
    try:
        with _writes_if(s, token):
            return unwrapping_key.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=mech,
                mechanism_param=param, label=label, store=token,
                template=_secret_template(token=token, label=label,
                                          usage=usage or CONTENT_USAGE, key_id=key_id))
    except px.PKCS11Error as exc:
        raise _fail(exc) from None


def _unwrap_mechanism(how: Unwrap) -> tuple[Mechanism, Any]:
    if how is Unwrap.AES_KW:
        return Mechanism.AES_KEY_WRAP, None
    if how is Unwrap.AES_KW_PAD:
        return Mechanism.AES_KEY_WRAP_PAD, None
    return Mechanism.RSA_PKCS_OAEP, (Mechanism.SHA_1, MGF.SHA1, None)


def key_length(key: Any, probe: Any = None) -> int:
    """Length in bytes of a secret key object.

    CKA_VALUE_LEN, where the token sets it; SoftHSM2 leaves it 0 after an RSA-OAEP unwrap,
    so then the key is wrapped (RFC 3394 adds 8 bytes) under `probe`, a key of the same
    token, and the wrapping thrown away. Only session keys are extractable, so only they
    can be measured that way.
    """
    n = int(key[A.VALUE_LEN] or 0)
    if n or probe is None:
        return n
    try:
        return len(wrap(probe, key)) - 8
    except HsmOperationFailed:
        return 0


def wrap(wrapping_key: Any, key: Any, *, pad: bool = False) -> bytes:
    if not hasattr(wrapping_key, "wrap_key"):  # python-pkcs11: a key without CKA_WRAP
        raise HsmOperationFailed("this key may not wrap")
    mech = Mechanism.AES_KEY_WRAP_PAD if pad else Mechanism.AES_KEY_WRAP
    if isinstance(key, SessionKey):
        return key.session.direct.wrap_key(key.session.raw.handle, mech, wrapping_key.handle,
                                           key.handle)
    try:
        return wrapping_key.wrap_key(key, mechanism=mech)
    except px.PKCS11Error as exc:
        raise _fail(exc) from None


def destroy(key: Any) -> None:
    """Destroy a session object; one already gone is fine, a broken session is not (it
    must reach `Token.session`, which retires it)."""
    try:
        if isinstance(key, SessionKey):
            key.session.direct.destroy_object(key.session.raw.handle, key.handle)
        else:
            key.destroy()
    except BROKEN_SESSION:
        raise
    except Exception:
        pass


# --------------------------------------------------------------------------- crypto
def gcm_decrypt(key: Any, iv: bytes, ciphertext_and_tag: bytes, aad: bytes = b"") -> bytes:
    try:
        return key.decrypt(ciphertext_and_tag, mechanism=Mechanism.AES_GCM,
                           mechanism_param=GCMParams(iv, aad, 128))
    except px.PKCS11Error as exc:
        if isinstance(exc, BROKEN_SESSION):
            raise  # the session, not the data: Token.session retires it
        raise HsmOperationFailed(f"GCM decryption failed ({type(exc).__name__})") from None


def gcm_encrypt(key: Any, iv: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    return key.encrypt(plaintext, mechanism=Mechanism.AES_GCM,
                       mechanism_param=GCMParams(iv, aad, 128))


def check_value(key: Any, method: Kcv = Kcv.CMAC) -> str:
    """The profile's KCV: CMAC -> leftmost 5 bytes, ECB -> leftmost 3, over 16 zero bytes."""
    if isinstance(key, SessionKey) and method is Kcv.CMAC:
        return key.session.direct.sign(key.session.raw.handle, Mechanism.AES_CMAC,
                                       key.handle, bytes(16))[:5].hex().upper()
    if isinstance(key, SessionKey):
        raise ValueError("ECB check values are computed on python-pkcs11 key objects")
    try:
        if method is Kcv.CMAC:
            return key.sign(bytes(16), mechanism=Mechanism.AES_CMAC)[:5].hex().upper()
        return key.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)[:3].hex().upper()
    except px.PKCS11Error as exc:
        raise _fail(exc) from None


def cmac(key: Any, data: bytes) -> bytes:
    return key.sign(data, mechanism=Mechanism.AES_CMAC)


def hmac_sha256(key: Any, data: bytes) -> bytes:
    return key.sign(data, mechanism=Mechanism.SHA256_HMAC)


def hmac_sha256_direct(s: Session, key: Any, data: bytes) -> bytes:
    """`hmac_sha256` for a loop over many records: C_SignInit + C_Sign, no wrapper."""
    return s.direct.sign(s.raw.handle, Mechanism.SHA256_HMAC, key.handle, data)


def random_bytes(s: Session, n: int) -> bytes:
    return s.raw.generate_random(n * 8)
