"""The backup secret split between custodians: any M of N shares rebuild it, fewer learn
nothing (Shamir's scheme), and each share is encrypted to one custodian's public key.

Shamir over GF(2^128) is pycryptodome's (`Crypto.Protocol.SecretSharing.Shamir`), which
takes 16-byte secrets: the 32-byte secret is split as two halves with the same share
indices, which its documentation gives as the way to share a longer secret.

A share is encrypted to the custodian's certificate key: RSA-OAEP with SHA-256, or for an
EC key ECDH with a one-time key, HKDF-SHA256 and AES-256-GCM (ECIES). The backup id, the
custodian's key fingerprint and the share index are bound in as associated data or label,
so a share cannot be moved to another backup or custodian unnoticed.
"""
from __future__ import annotations

import json
from base64 import b64decode, b64encode
from dataclasses import dataclass
from typing import Any

from Crypto.Protocol.SecretSharing import Shamir
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keysvc.errors import error
from keysvc.identity.certificates import fingerprint

SECRET_BYTES = 32
FORMAT = "keysvc-backup-share/1"


@dataclass(frozen=True)
class Share:
    """One custodian's share as written to a file: only its holder's private key opens it."""

    backup_id: str
    custodian: str      # SHA-256 of the custodian's public key (as officers are named)
    index: int
    algorithm: str
    ephemeral: bytes    # the one-time EC public key (ECIES); empty for RSA
    ciphertext: bytes

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "backup_id": self.backup_id,
                           "custodian": self.custodian, "index": self.index,
                           "algorithm": self.algorithm,
                           "ephemeral": b64encode(self.ephemeral).decode(),
                           "ciphertext": b64encode(self.ciphertext).decode()}, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Share":
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise ValueError("not a keysvc backup share")
            return cls(str(d["backup_id"]), str(d["custodian"]), int(d["index"]),
                       str(d["algorithm"]), b64decode(d["ephemeral"], validate=True),
                       b64decode(d["ciphertext"], validate=True))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise error("SHARE_INVALID", f"not a keysvc backup share ({exc})") from None


def split(secret: bytes | bytearray, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """(index, 32-byte share) for each of `count` custodians; any `threshold` rebuild."""
    if len(secret) != SECRET_BYTES:
        raise ValueError("the backup secret is 32 bytes")
    if not 2 <= threshold <= count:
        raise error("INVALID_REQUEST", f"a backup needs 2 <= threshold <= custodians "
                                       f"(got {threshold} of {count})")
    low = Shamir.split(threshold, count, bytes(secret[:16]))
    high = Shamir.split(threshold, count, bytes(secret[16:]))
    return [(i, a + b) for (i, a), (j, b) in zip(low, high) if i == j]


def combine(parts: list[tuple[int, bytes | bytearray]]) -> bytearray:
    """The secret from shares (too few give a wrong secret, which the blob's tag refuses)."""
    low = Shamir.combine([(i, bytes(p[:16])) for i, p in parts])
    high = Shamir.combine([(i, bytes(p[16:])) for i, p in parts])
    return bytearray(low + high)


def _context(backup_id: str, custodian: str, index: int) -> bytes:
    return f"{FORMAT}|{backup_id}|{custodian}|{index}".encode()


def _ecies_key(shared: bytes, context: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=context).derive(shared)


def encrypt(certificate: x509.Certificate, backup_id: str, index: int, share: bytes) -> Share:
    who = fingerprint(certificate)
    context = _context(backup_id, who, index)
    public = certificate.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        ct = public.encrypt(share, padding.OAEP(padding.MGF1(hashes.SHA256()),
                                                hashes.SHA256(), label=context))
        return Share(backup_id, who, index, "RSA-OAEP-SHA256", b"", ct)
    if isinstance(public, ec.EllipticCurvePublicKey):
        one_time = ec.generate_private_key(public.curve)
        ephemeral = one_time.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        key = _ecies_key(one_time.exchange(ec.ECDH(), public), context + ephemeral)
        ct = AESGCM(key).encrypt(bytes(12), share, context)  # the key is used once
        return Share(backup_id, who, index, "ECIES-HKDF-SHA256-AES256GCM", ephemeral, ct)
    raise error("INVALID_CERTIFICATE", "a custodian's certificate key must be RSA or EC")


def decrypt(share: Share, private_key: Any) -> bytearray:
    """The share in clear, with the custodian's private key; a key that is not the one the
    share was made for, or a share altered, is refused (SHARE_INVALID)."""
    context = _context(share.backup_id, share.custodian, share.index)
    try:
        if share.algorithm == "RSA-OAEP-SHA256" and isinstance(private_key,
                                                                rsa.RSAPrivateKey):
            out = private_key.decrypt(share.ciphertext, padding.OAEP(
                padding.MGF1(hashes.SHA256()), hashes.SHA256(), label=context))
        elif share.algorithm.startswith("ECIES") and isinstance(private_key,
                                                                ec.EllipticCurvePrivateKey):
            peer = ec.EllipticCurvePublicKey.from_encoded_point(private_key.curve,
                                                                share.ephemeral)
            key = _ecies_key(private_key.exchange(ec.ECDH(), peer), context + share.ephemeral)
            out = AESGCM(key).decrypt(bytes(12), share.ciphertext, context)
        else:
            raise ValueError("key type")
    except Exception:
        raise error("SHARE_INVALID", f"share {share.index} does not open with this "
                                     "custodian's private key") from None
    if len(out) != SECRET_BYTES:
        raise error("SHARE_INVALID", f"share {share.index} has the wrong length")
    return bytearray(out)  # zeroed by the restore once combined
