"""The backup ceremony and the restore: a partition's long-lived keys out of the token,
wrapped inside it, and back into an empty token with any M of N custodians.

Backup (`keysvc admin backup`, on the HSM's host, with the token's PINs):
1. A fresh 32-byte backup secret from the token's generator, and a one-time RSA-3072 pair
   made in this process (the backup pair).
2. As security officer, the backup pair's public half is made a token object marked
   CKA_TRUSTED that can only wrap, and can be neither changed nor copied. Every long-lived
   key is CKA_WRAP_WITH_TRUSTED (hk.CUSTODY), so only such a key can wrap one, and the
   user PIN cannot make one. A public key holds no secret, so nothing secret is ever in
   the token's files for this (SoftHSM2 keeps public objects' values in clear).
3. With the user PIN, every version of every long-lived key (`LONG_LIVED`) is wrapped
   under it inside the token (C_WrapKey, RSA-OAEP), and the public key object is destroyed.
4. The wrapped keys, the backup pair's private half and the token's data objects (audit
   and record anchors, the roster, markers: integrity state, not secrets) form the
   manifest, encrypted and bound to its header with AES-256-GCM under a key derived from
   the secret (HKDF-SHA256, the backup id in the info).
5. The secret is split M-of-N (custody/shares.py), each share encrypted to a custodian's
   enrolled officer certificate; the secret is zeroed.
Restore (`keysvc admin restore`, the server stopped) does the reverse into a token that
holds no keysvc keys: M custodians' shares rebuild the secret, the manifest must open, the
private half becomes a session object that can only unwrap, and only then is anything
written; a failure half-way destroys what was written.

Where key bits are outside the HSM: the secret, the manifest key and the backup pair's
private half are in this process's memory for the ceremony (milliseconds), never on disk in
clear or in a log. The secret is kept in a bytearray zeroed when done; the token's random
bytes it came from, the derived key and the private key are Python objects that cannot be
zeroed and are dropped. A share is in clear only inside `split`/`encrypt` and, in a
restore, between `shares.decrypt` and `combine` (zeroed after). The long-lived keys never
leave the token in clear: they are wrapped and unwrapped by C_WrapKey/C_UnwrapKey.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import operator
import re
import time
import uuid
from base64 import b64decode, b64encode
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from prometheus_client import Gauge

from keysvc.audit.anchor import fixed_form
from keysvc.custody import shares as sh
from keysvc.custody import versions
from keysvc.errors import error
from keysvc.hsm import keys as hk
from keysvc.hsm.token import Token, security_officer
from keysvc.identity.certificates import fingerprint
from keysvc.partitions import KIND, LONG_LIVED

FORMAT = "keysvc-backup/1"
LAST_BACKUP = "custody:last-backup"   # data object: when and which versions, for freshness
# Data object a restore leaves in the token it filled: the next start audits it and removes
# it (a restore runs with the server stopped, and opening the service before every
# partition is restored would make new keys in the partitions still empty).
RESTORED = "custody:restored"


@dataclass(frozen=True)
class Backup:
    backup_id: str
    partition: str
    blob: bytes
    shares: list[sh.Share]
    versions: dict[str, list[int]]
    created: dt.datetime


def _derive(secret: bytes | bytearray, what: str, backup_id: str) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None,
                info=f"keysvc backup {what}|{backup_id}".encode()).derive(bytes(secret))


TRUSTED_PREFIX = "keysvc-backup-"


def _trusted_label(backup_id: str) -> str:
    return f"{TRUSTED_PREFIX}{backup_id}"


def _zero(b: bytearray) -> None:
    b[:] = bytes(len(b))


@dataclass
class Prepared:
    """What step 1 leaves for step 3: the secret and the backup pair's private half."""

    backup_id: str
    secret: bytearray = field(repr=False)
    private_key: Any = field(repr=False)

    def forget(self) -> None:
        _zero(self.secret)
        self.private_key = None


def prepare(module: str, token_label: str, so_pin: str, backup_id: str) -> Prepared:
    """Steps 1-2, as security officer. Must run before this process opens the token with
    the user PIN (login state belongs to the process)."""
    private_key = rsa.generate_private_key(65537, 3072)
    public = private_key.public_key().public_numbers()
    with security_officer(module, token_label, so_pin) as so:
        secret = bytearray(so.raw.generate_random(256))
        hk.create_trusted_wrapping_key(so, _trusted_label(backup_id), public.n, public.e)
    return Prepared(backup_id, secret, private_key)


def take(token: Token, partition: str, prepared: Prepared,
         custodians: list[x509.Certificate], threshold: int, now: dt.datetime) -> Backup:
    """Steps 3-5 with the user PIN. The secret is zeroed whatever happens."""
    backup_id, secret = prepared.backup_id, prepared.secret
    try:
        parts = sh.split(secret, threshold, len(custodians))
        with token.session(missing_means_down=False) as s:
            mine = prepared.private_key.public_key().public_numbers()
            try:
                trusted = hk.trusted_wrapping_key(s, _trusted_label(backup_id), mine.n, mine.e)
            except hk.HsmKeyNotFound:
                raise error("BACKUP_NOT_POSSIBLE", "the backup key in the token is gone or "
                                                   "is not this ceremony's: run it again"
                                                   ) from None
            try:
                found = versions.all_versions(s, LONG_LIVED[partition])
                keys = []
                for base, vs in found.items():
                    for v in vs:
                        label = versions.label(base, v)
                        if hk.custody_attributes(s, label) != {"extractable": True,
                                                               "wrap_with_trusted": True}:
                            raise error("BACKUP_NOT_POSSIBLE",
                                        f"{label} in the {partition} token was made before "
                                        "keys could be backed up: rotate it first")
                        try:
                            wrapped = hk.wrap_oaep(trusted, hk.find_key(s, label))
                        except hk.HsmOperationFailed as exc:
                            raise error("BACKUP_NOT_POSSIBLE", f"the HSM refused to wrap "
                                                               f"{label} ({exc})") from None
                        keys.append({"label": label, "wrapped": b64encode(wrapped).decode()})
            finally:
                with s.store.exclusive():  # a token object
                    hk.destroy(trusted)
                hk.forget(s, _trusted_label(backup_id))
            # (A moving audit anchor goes in its fixed form, which a restore writes back.)
            data = [{"label": name, "value": b64encode(value).decode()}
                    for label, values in sorted(hk.data_by_label(s, "").items())
                    if label not in (LAST_BACKUP, RESTORED) for v in values
                    for name, value in [fixed_form(label, v)]]
        header = {"format": FORMAT, "backup_id": backup_id, "partition": partition,
                  "token_label": token.config.label, "created": now.isoformat(),
                  "threshold": threshold,
                  "custodians": [fingerprint(c) for c in custodians], "versions": found}
        private_der = prepared.private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        manifest = json.dumps({"keys": keys, "data": data,
                               "private_key": b64encode(private_der).decode()}).encode()
        del private_der
        nonce = bytes(12)  # the manifest key is derived for this one backup and used once
        ct = AESGCM(_derive(secret, "manifest", backup_id)).encrypt(
            nonce, manifest, _aad(header))
        del manifest
        blob = json.dumps({"header": header, "ciphertext": b64encode(ct).decode()},
                          indent=1).encode()
        out = [sh.encrypt(c, backup_id, i, p) for c, (i, p) in zip(custodians, parts)]
        del parts
        return Backup(backup_id, partition, blob, out, found, now)
    finally:
        prepared.forget()


def record(token: Token, backup: Backup) -> None:
    """The partition's last backup, once its files are written and read back (`keysvc
    admin backup`): what freshness and DestroyKeyVersion go by."""
    with token.session() as s:
        hk.destroy_data(s, LAST_BACKUP)
        hk.put_data(s, LAST_BACKUP, json.dumps(
            {"backup_id": backup.backup_id, "time": backup.created.isoformat(),
             "versions": backup.versions,
             "sha256": hashlib.sha256(backup.blob).hexdigest()}).encode())


LEFTOVER_AFTER = 1800.0  # seconds: no ceremony takes this long; an older key is a leftover
CLOCK_SKEW = 300.0       # seconds a ceremony's host clock may be ahead of this one


def discard(token: Token, backup_id: str) -> None:
    """The ceremony's own backup key, when it ends whatever happened (never another
    ceremony's, which may be running on the same token)."""
    with token.session(missing_means_down=False) as s:
        hk.destroy_objects(s, _trusted_label(backup_id))


def discard_leftovers(token: Token, older_than: float = LEFTOVER_AFTER) -> list[str]:
    """Destroy the backup keys that killed ceremonies left in the token (made more than
    `older_than` seconds ago: a ceremony running now keeps its key); returns their labels.
    Run at every start. A leftover is harmless - a public key whose private half died with
    its ceremony - but it should not stay."""
    now = time.time()

    def left_over(label: str) -> bool:
        made = _made_at(label[len(TRUSTED_PREFIX):])
        # Younger than `older_than`: a ceremony that may be running (a future date is not).
        return made is None or not 0 <= now - made + CLOCK_SKEW < older_than
    with token.session(missing_means_down=False) as s:
        return hk.destroy_keys_labelled(s, TRUSTED_PREFIX, left_over)


def remove_leftovers(app: Any) -> None:
    """`discard_leftovers` in every partition, each removal audited (at start and every
    minute in a running server)."""
    for name, token in app.partitions.tokens.items():
        for label in discard_leftovers(token):
            app.audit.append(actor="keysvc", role="", action="custody.backup_key_removed",
                             target=f"{name}: {label}, left by an unfinished backup ceremony")


def report_restores(app: Any) -> None:
    """At start: audit each restore done since the last start, then forget it."""
    for partition, token in app.partitions.tokens.items():
        with token.session() as s:
            values = hk.data_values(s, RESTORED)
        for v in values:
            try:
                d = json.loads(v)
                detail = (f"{partition} from backup {d['backup_id']} made {d.get('created')}"
                          f": {d['keys']} keys, "
                          f"{d['data_objects']} data objects, {d['shares']} shares")
            except (ValueError, KeyError, TypeError):
                detail = f"{partition}: an unreadable restore record"
            app.audit.append(actor="keysvc", role="", action="custody.restore",
                             target=detail)
            with token.session() as s:
                hk.destroy_data(s, RESTORED, partial(operator.eq, v))


BACKUP_AGE = Gauge("keysvc_backup_age_seconds",
                   "seconds since the partition's last backup ceremony (-1: never)",
                   ["partition"])
UNBACKED = Gauge("keysvc_key_versions_without_backup",
                 "long-lived key versions in the token that no backup holds", ["partition"])


def freshness(app: Any) -> dict[str, tuple[float, int]]:
    """partition -> (age of the last backup in seconds or -1, versions it lacks); also the
    two gauges. Read from the tokens, every minute (server.HealthWatch)."""
    out = {}
    now = app.clock()
    for p, token in app.partitions.tokens.items():
        last = last_backup(token) or {}
        with token.session() as s:
            present = versions.all_versions(s, LONG_LIVED[p])
        held = last.get("versions", {})
        missing = sum(1 for key, vs in present.items() for v in vs
                      if v not in held.get(key, []))
        when = last.get("time")
        age = (now - dt.datetime.fromisoformat(when)).total_seconds() if when else -1.0
        BACKUP_AGE.labels(p).set(age)
        UNBACKED.labels(p).set(missing)
        out[p] = (age, missing)
    return out


def _aad(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def new_id() -> str:
    """A backup id that says when it was made (seconds since the epoch), so that a start
    can tell a killed ceremony's leftover from a ceremony running now."""
    return f"{int(time.time())}-{uuid.uuid4().hex[:12]}"


def _made_at(backup_id: str) -> float | None:
    m = re.fullmatch(r"([0-9]{1,12})-[0-9a-f]{12}", backup_id)
    return float(m.group(1)) if m else None


def last_backup(token: Token) -> dict | None:
    """{backup_id, time, versions} of the partition's last backup, read from its token."""
    with token.session() as s:
        values = hk.data_values(s, LAST_BACKUP)
    if not values:
        return None
    try:
        return json.loads(values[-1])
    except ValueError:
        return None


# --------------------------------------------------------------------------- restore
@dataclass(frozen=True)
class Restored:
    backup_id: str
    created: str
    keys: list[str]
    data_objects: int


def header_of(blob: bytes) -> tuple[dict, bytes]:
    """The backup's header, each field of the type it must have, and its ciphertext."""
    try:
        d = json.loads(blob)
        header, ct = d["header"], b64decode(d["ciphertext"], validate=True)
        if header.get("format") != FORMAT:
            raise ValueError("format")
        for name, kind in (("backup_id", str), ("partition", str), ("created", str),
                           ("threshold", int), ("custodians", list), ("versions", dict)):
            if not isinstance(header[name], kind):
                raise TypeError(name)
        if not all(isinstance(c, str) for c in header["custodians"]):
            raise TypeError("custodians")
        return header, ct
    except (ValueError, KeyError, TypeError, AttributeError):
        raise error("BACKUP_INVALID", "not a keysvc backup file") from None


def open_manifest(blob: bytes, partition: str, opened: list[tuple[sh.Share, bytearray]]
                  ) -> tuple[dict, dict]:
    """Check the shares against the backup, rebuild the secret and open the manifest under
    it (fewer or wrong shares give another secret, which its tag refuses). The shares in
    clear and the secret are zeroed here."""
    try:
        header, ct = header_of(blob)
        if header["partition"] != partition:
            raise error("BACKUP_INVALID", f"this backup is of the {header['partition']} "
                                          f"partition, not {partition}")
        for share, _ in opened:
            if share.backup_id != header["backup_id"] or share.custodian not in \
                    header["custodians"]:
                raise error("SHARE_INVALID", f"share {share.index} belongs to another "
                                             "backup or custodian")
        parts = {share.index: clear for share, clear in opened}
        if len(parts) < header["threshold"]:
            raise error("NOT_ENOUGH_SHARES", f"this backup needs {header['threshold']} "
                                             f"custodians' shares; {len(parts)} given")
        secret = sh.combine(sorted(parts.items()))
    finally:
        for _, clear in opened:
            _zero(clear)
    try:
        manifest = json.loads(AESGCM(_derive(secret, "manifest", header["backup_id"]))
                              .decrypt(bytes(12), ct, _aad(header)))
    except Exception:
        raise error("BACKUP_INVALID", "the shares do not open this backup (a share or the "
                                      "file was altered)") from None
    finally:
        _zero(secret)
    return header, manifest


def restore(token: Token, partition: str, blob: bytes,
            opened: list[tuple[sh.Share, bytearray]]) -> Restored:
    """Into a token holding no keysvc key or data object; all or nothing."""
    header, manifest = open_manifest(blob, partition, opened)
    try:
        keys = [(str(k["label"]), b64decode(k["wrapped"], validate=True))
                for k in manifest["keys"]]
        data = [(str(d["label"]), b64decode(d["value"], validate=True))
                for d in manifest["data"]]
        private_der = b64decode(manifest["private_key"], validate=True)
        if any(versions.parse(label)[0] not in LONG_LIVED[partition] for label, _ in keys):
            raise ValueError("a key of another partition")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise error("BACKUP_INVALID", "the backup's manifest is not well formed") from None
    made: list[Any] = []
    with token.session(missing_means_down=False) as s:
        present = [label for label in hk.secret_key_labels(s)
                   if versions.parse(label)[0] in LONG_LIVED[partition]]
        if present or hk.data_by_label(s, ""):
            raise error("TOKEN_NOT_EMPTY", f"the {partition} token already holds keysvc "
                                           "keys or state: restore only into an empty token")
        unwrapping = hk.rsa_unwrapping_key(s, serialization.load_der_private_key(
            private_der, None))
        del private_der
        try:
            for label, wrapped in keys:
                aes, usage = KIND[versions.parse(label)[0]]
                with s.store.exclusive():
                    made.append(hk.unwrap_long_lived(unwrapping, wrapped, label, aes=aes,
                                                     usage=usage))
            for label, value in data:
                hk.put_data(s, label, value)
            # The restored keys are exactly those of this backup.
            hk.put_data(s, LAST_BACKUP, json.dumps(
                {"backup_id": header["backup_id"], "time": header["created"],
                 "versions": header["versions"]}).encode())
            hk.put_data(s, RESTORED, json.dumps({
                "backup_id": header["backup_id"], "created": header["created"],
                "keys": len(keys), "data_objects": len(data),
                "shares": len(opened)}).encode())
        except Exception:
            with s.store.exclusive():  # token objects
                for obj in made:
                    hk.destroy(obj)
            for label in [label for label, _ in data] + [LAST_BACKUP, RESTORED]:
                hk.destroy_data(s, label)
            raise
        finally:
            hk.destroy(unwrapping)
    return Restored(header["backup_id"], header["created"], [label for label, _ in keys],
                    len(data))
