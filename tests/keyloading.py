"""Loading transport keys the way a key ceremony does: import job, OAEP wrap, two officers.

Tests use the real KeyAdministration path, so every example key reaches the token exactly
as a production key would.
"""
from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from keysvc import keyadmin
from keysvc.app import App
from keysvc.records.keys import KeyRecord
from tests.conftest import OFFICER_1, OFFICER_2
from tests.support.encoder import kcv

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def wrap_for_job(job_public_pem: str, key: bytes) -> bytes:
    return serialization.load_pem_public_key(job_public_pem.encode()).encrypt(key, OAEP)


def load_aes_key(app: App, name: str, key: bytes, *, purpose: str, owner_id: str,
                 owner_type: str = "SMSO") -> None:
    job = keyadmin.create_import_job(app, OFFICER_1, f"job for {name}", purpose)
    op = keyadmin.import_transport_key(
        app, OFFICER_1, name=name, purpose=purpose, owner_id=owner_id, owner_type=owner_type,
        expected_kcv=kcv(key), wrapped_key=wrap_for_job(job.public_key_pem, key),
        import_job_id=job.import_job_id)
    keyadmin.approve(app, OFFICER_2, op.operation_id)


def load_example_keys(app: App, example_dir, expect: dict) -> None:
    """The example's S1SP and DCO transport keys, under the names its file uses."""
    if expect["transport"] == "kw":
        for field, purpose in (("s1sp_transport_key", "S1SP_TRANSPORT"),
                               ("dco_transport_key", "DCO_TRANSPORT")):
            k = expect[field]
            load_aes_key(app, k["name"], bytes.fromhex(k["hex"]), purpose=purpose,
                         owner_id=expect["originator_id"])
    else:
        for field, pem, purpose in (("s1sp_transport_key", "s1sp_rsa.pem", "S1SP_TRANSPORT"),
                                    ("dco_transport_key", "dco_rsa.pem", "DCO_TRANSPORT")):
            private = serialization.load_pem_private_key((example_dir / pem).read_bytes(), None)
            keyadmin.register_existing_rsa_key(
                app, name=expect[field]["name"], purpose=purpose,
                allowed_originators=[expect["originator_id"]], private_key=private)


def register_key_record(app: App, rec: KeyRecord) -> None:
    """The sealed, anchored record of a key already in the shared test token, in this
    test's database (each test has its own database; the token outlives them)."""
    with app.records.anchors(rec.partition).tx(app.store) as (conn, anchor):
        if not app.records.keys.exists(conn, rec.name):
            app.records.keys.insert(conn, anchor, rec)


def set_key_state(app: App, name: str, state: str) -> None:
    """Change a key's state through the records layer, as an approved operation does."""
    rec = app.records.keys.get(name)
    with app.records.anchors(rec.partition).tx(app.store) as (conn, anchor):
        app.records.keys.set_state(conn, anchor, app.records.keys.get(name, conn,
                                                                      for_update=True), state)


def token_key_id(app: App, partition: str, name: str, cls=None) -> str:
    """The CKA_ID of the token object a key record must name."""
    from pkcs11 import ObjectClass

    from keysvc.hsm import keys as hk
    with app.partitions.tokens[partition].session() as s:
        return hk.object_facts(s, name, cls or ObjectClass.SECRET_KEY, {}).key_id
