"""The backup ceremony and the restore: a partition's long-lived keys out of the token,
wrapped inside it, and back into an empty token with any M of N custodians.

Backup (`keysvc admin backup`, on the HSM's host, with the token's PINs):
1. A fresh 32-byte backup secret from the token's generator. From it (HKDF-SHA256, the
   backup id in the info) come the wrapping key and the manifest key.
2. As security officer, the wrapping key is made a token object marked CKA_TRUSTED and
   able only to wrap. Every long-lived key is CKA_WRAP_WITH_TRUSTED (hk.CUSTODY), so this
   is the only kind of key that can wrap one; the user PIN cannot make such a key.
3. With the user PIN, every version of every long-lived key (`LONG_LIVED`) is wrapped
   under it inside the token (RFC 3394), and the wrapping key is destroyed.
4. The token's data objects (audit and record anchors, the roster, markers: integrity
   state, not secrets) and the wrapped keys form the manifest, encrypted and bound to its
   header with AES-256-GCM under the manifest key.
5. The secret is split M-of-N (custody/shares.py), each share encrypted to a custodian's
   enrolled officer certificate; the secret is zeroed.
Restore (`keysvc admin restore`, the server stopped) does the reverse into a token that
holds no keysvc keys: M custodians' shares rebuild the secret, the manifest must open, and
only then is anything written; a failure half-way destroys what was written.

Where key bits are outside the HSM: the backup secret and the two keys derived from it are
in this process's memory for the ceremony (milliseconds), never on disk or in a log. The
secret is a bytearray zeroed when done; the derived keys are Python bytes, which cannot be
zeroed and are dropped. A share is in clear only inside `shares.decrypt`/`combine` during
a restore. The long-lived keys themselves never leave the token in clear: they are wrapped
and unwrapped by C_WrapKey/C_UnwrapKey.
"""
from __future__ import annotations

import datetime as dt
import json
import uuid
from base64 import b64decode, b64encode
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from prometheus_client import Gauge
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pkcs11 import Attribute as A
from pkcs11 import KeyType, Mechanism, ObjectClass

from hsm import keys as hk
from hsm.token import Token, security_officer
from keysvc.custody import shares as sh
from keysvc.custody import versions
from keysvc.errors import error
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


def _derive(secret: bytes | bytearray, what: str, backup_id: str) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None,
                info=f"keysvc backup {what}|{backup_id}".encode()).derive(bytes(secret))


def _trusted_label(backup_id: str) -> str:
    return f"keysvc-backup-{backup_id}"


def _zero(b: bytearray) -> None:
    b[:] = bytes(len(b))


def prepare(module: str, token_label: str, so_pin: str, backup_id: str) -> bytearray:
    """Steps 1-2, as security officer: the backup secret, and its wrapping key in the token
    marked trusted. Must run before this process opens the token with the user PIN."""
    with security_officer(module, token_label, so_pin) as so:
        secret = bytearray(so.generate_random(256))
        so.create_object({
            A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES,
            A.VALUE: _derive(secret, "wrap", backup_id), A.LABEL: _trusted_label(backup_id),
            A.TOKEN: True, A.PRIVATE: False, A.SENSITIVE: True, A.EXTRACTABLE: False,
            A.TRUSTED: True, A.WRAP: True, A.UNWRAP: False, A.ENCRYPT: False,
            A.DECRYPT: False, A.SIGN: False, A.VERIFY: False, A.DERIVE: False})
    return secret


def take(token: Token, partition: str, backup_id: str, secret: bytearray,
         custodians: list[x509.Certificate], threshold: int,
         now: dt.datetime) -> Backup:
    """Steps 3-5 with the user PIN. The secret is zeroed whatever happens."""
    try:
        parts = sh.split(secret, threshold, len(custodians))
        with token.session() as s:
            trusted = hk.find_key(s, _trusted_label(backup_id))
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
                        keys.append({"label": label,
                                     "wrapped": b64encode(hk.wrap(trusted, hk.find_key(
                                         s, label))).decode()})
            finally:
                hk.destroy(trusted)
                hk.forget(s, _trusted_label(backup_id))
            data = [{"label": label, "value": b64encode(v).decode()}
                    for label, values in sorted(hk.data_by_label(s, "").items())
                    if label != LAST_BACKUP for v in values]
        header = {"format": FORMAT, "backup_id": backup_id, "partition": partition,
                  "token_label": token.config.label, "created": now.isoformat(),
                  "threshold": threshold,
                  "custodians": [fingerprint(c) for c in custodians], "versions": found}
        manifest = json.dumps({"keys": keys, "data": data}).encode()
        nonce = bytes(12)  # the manifest key is derived for this one backup and used once
        ct = AESGCM(_derive(secret, "manifest", backup_id)).encrypt(
            nonce, manifest, _aad(header))
        blob = json.dumps({"header": header, "ciphertext": b64encode(ct).decode()},
                          indent=1).encode()
        out = [sh.encrypt(c, backup_id, i, p) for c, (i, p) in zip(custodians, parts)]
        with token.session() as s:
            hk.destroy_data(s, LAST_BACKUP)
            hk.put_data(s, LAST_BACKUP, json.dumps(
                {"backup_id": backup_id, "time": now.isoformat(), "versions": found}).encode())
        return Backup(backup_id, partition, blob, out, found)
    finally:
        _zero(secret)


def discard(token: Token, backup_id: str) -> None:
    """Destroy a prepared trusted wrapping key that was not used (a failed ceremony)."""
    with token.session(missing_means_down=False) as s:
        hk.destroy_objects(s, _trusted_label(backup_id))


def report_restores(app: Any) -> None:
    """At start: audit each restore done since the last start, then forget it."""
    for partition, token in app.partitions.tokens.items():
        with token.session() as s:
            values = hk.data_values(s, RESTORED)
        for v in values:
            try:
                d = json.loads(v)
                detail = (f"{partition} from backup {d['backup_id']}: {d['keys']} keys, "
                          f"{d['data_objects']} data objects, {d['shares']} shares")
            except (ValueError, KeyError, TypeError):
                detail = f"{partition}: an unreadable restore record"
            app.audit.append(actor="keysvc", role="", action="custody.restore",
                             target=detail)
            with token.session() as s:
                hk.destroy_data(s, RESTORED, lambda value, v=v: value == v)


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
    return uuid.uuid4().hex[:16]


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
    keys: list[str]
    data_objects: int


def header_of(blob: bytes) -> tuple[dict, bytes]:
    try:
        d = json.loads(blob)
        header, ct = d["header"], b64decode(d["ciphertext"], validate=True)
        if header.get("format") != FORMAT:
            raise ValueError("format")
        int(header["threshold"]), str(header["partition"]), str(header["backup_id"])
        return header, ct
    except (ValueError, KeyError, TypeError):
        raise error("BACKUP_INVALID", "not a keysvc backup file") from None


def open_manifest(blob: bytes, partition: str, opened: list[tuple[sh.Share, bytes]]
                  ) -> tuple[dict, dict, bytearray]:
    """Check the shares against the backup and rebuild the secret; the manifest must open
    under it (fewer or wrong shares give another secret, which its tag refuses)."""
    header, ct = header_of(blob)
    if header["partition"] != partition:
        raise error("BACKUP_INVALID", f"this backup is of the {header['partition']} "
                                      f"partition, not {partition}")
    for share, _ in opened:
        if share.backup_id != header["backup_id"] or share.custodian not in \
                header["custodians"]:
            raise error("SHARE_INVALID", f"share {share.index} belongs to another backup "
                                         "or custodian")
    parts = {share.index: clear for share, clear in opened}
    if len(parts) < int(header["threshold"]):
        raise error("NOT_ENOUGH_SHARES", f"this backup needs {header['threshold']} "
                                         f"custodians' shares; {len(parts)} given")
    secret = sh.combine(sorted(parts.items()))
    try:
        manifest = json.loads(AESGCM(_derive(secret, "manifest", header["backup_id"]))
                              .decrypt(bytes(12), ct, _aad(header)))
    except Exception:
        _zero(secret)
        raise error("BACKUP_INVALID", "the shares do not open this backup (a share or the "
                                      "file was altered)") from None
    return header, manifest, secret


def restore(token: Token, partition: str, blob: bytes,
            opened: list[tuple[sh.Share, bytes]]) -> Restored:
    """Into a token holding no keysvc key or data object; all or nothing."""
    header, manifest, secret = open_manifest(blob, partition, opened)
    made: list[Any] = []
    try:
        with token.session(missing_means_down=False) as s:
            present = [label for label in hk.secret_key_labels(s)
                       if versions.parse(label)[0] in LONG_LIVED[partition]]
            if present or hk.data_by_label(s, ""):
                raise error("TOKEN_NOT_EMPTY", f"the {partition} token already holds keysvc "
                                               "keys or state: restore only into an empty "
                                               "token")
            unwrapping = s.raw.create_object({
                A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES,
                A.VALUE: _derive(secret, "wrap", header["backup_id"]), A.TOKEN: False,
                A.SENSITIVE: True, A.EXTRACTABLE: False, A.UNWRAP: True, A.WRAP: False,
                A.ENCRYPT: False, A.DECRYPT: False})
            try:
                for k in manifest["keys"]:
                    aes, usage = KIND[versions.parse(k["label"])[0]]
                    made.append(unwrapping.unwrap_key(
                        ObjectClass.SECRET_KEY, KeyType.AES if aes else KeyType.GENERIC_SECRET,
                        b64decode(k["wrapped"]), mechanism=Mechanism.AES_KEY_WRAP,
                        label=k["label"], store=True,
                        template=hk.long_lived_template(k["label"], usage)))
                for d in manifest["data"]:
                    hk.put_data(s, d["label"], b64decode(d["value"]))
                # The restored keys are exactly those of this backup.
                hk.put_data(s, LAST_BACKUP, json.dumps(
                    {"backup_id": header["backup_id"], "time": header["created"],
                     "versions": header["versions"]}).encode())
                hk.put_data(s, RESTORED, json.dumps({
                    "backup_id": header["backup_id"], "keys": len(manifest["keys"]),
                    "data_objects": len(manifest["data"]), "shares": len(opened)}).encode())
            except Exception:
                for obj in made:
                    hk.destroy(obj)
                for label in [d["label"] for d in manifest["data"]] + [LAST_BACKUP,
                                                                       RESTORED]:
                    hk.destroy_data(s, label)
                raise
            finally:
                hk.destroy(unwrapping)
    finally:
        _zero(secret)
    return Restored(header["backup_id"], [k["label"] for k in manifest["keys"]],
                    len(manifest["data"]))
