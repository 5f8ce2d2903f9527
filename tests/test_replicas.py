"""Two keysvc processes on one PostgreSQL database and one SoftHSM2 token directory."""
from __future__ import annotations

import datetime as dt
import os
import threading
import uuid

import grpc
import psycopg
import pytest

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from tests.conftest import fresh_postgres_database
from tests.serverproc import start_server
from tests.support import certs, encoder


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    url = fresh_postgres_database("keysvc_replicas")
    state = tmp_path_factory.mktemp("replicas")
    factory = encoder.DeviceCertificateFactory()
    ca = state.parent / f"{state.name}-ca.pem"
    ca.write_bytes(factory.ca_pem)
    env = {"KEYSVC_DATABASE_URL": url, "KEYSVC_DEV": "on"}
    a = start_server(state, trust_anchors=[ca], env=env)
    b = start_server(state, trust_anchors=[ca], env=env)
    yield a, b, factory, url
    assert a.stop() == 0 and b.stop() == 0


def _file(a, factory, n=4):
    s1sp_kek, dco_kek = os.urandom(32), os.urandom(32)
    tag = uuid.uuid4().hex[:8]
    a.import_aes_key(f"S1SP-{tag}", s1sp_kek, purpose="S1SP_TRANSPORT", owner_id="SMSO-R")
    a.import_aes_key(f"DCO-{tag}", dco_kek, purpose="DCO_TRANSPORT", owner_id="SMSO-R")
    installs = encoder.random_installations(n, cert_factory=factory)
    return encoder.build_file(installs, file_id=f"MGEF-R-{tag}", originator_id="SMSO-R",
                              s1sp_key_name=f"S1SP-{tag}", s1sp_kek=s1sp_kek,
                              dco_key_name=f"DCO-{tag}", dco_kek=dco_kek)


def _concurrently(*calls):
    out = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i, call):
        barrier.wait()
        try:
            out[i] = call()
        except grpc.RpcError as exc:
            out[i] = exc
    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out


def test_same_file_sent_to_two_replicas_at_once_is_processed_once(replicas):
    a, b, factory, url = replicas
    data = _file(a, factory)
    req = pb.ProcessGroupInformationRequest(file=data)
    ra, rb = _concurrently(lambda: a.as_("s1sp").s1sp.ProcessGroupInformation(req),
                           lambda: b.as_("s1sp").s1sp.ProcessGroupInformation(req))
    assert ra == rb and ra.accepted_count == 4
    file_id = ra.migration_file_id
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM migration_files WHERE file_id=%s",
                            (file_id,)).fetchone()[0] == 1
        keys = conn.execute("SELECT count(*) FROM device_keys WHERE file_id=%s",
                            (file_id,)).fetchone()[0]
    assert keys == sum(len(i.keys) for i in ra.installations)


def test_a_key_imported_on_one_replica_is_usable_on_the_other(replicas):
    """Also after the other replica wrote to the token itself: SoftHSM2 then stops noticing
    other processes' objects until the module is re-initialised, which keysvc does."""
    a, b, factory, _ = replicas
    data = _file(a, factory, n=1)
    b.as_("security-officer-1").admin.CreateImportJob(pb.CreateImportJobRequest(
        name="b writes to the token", purpose=pb.DCO_TRANSPORT))
    r = b.as_("dco").dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=data))
    assert r.accepted_count == 1


def test_escrow_max_releases_holds_across_replicas(replicas):
    a, b, _, _ = replicas
    ca, _ = certs.make_ca("Replica rollback CA")
    today = dt.date.today()
    chf = "00-AA-BB-CC-DD-EE-" + uuid.uuid4().hex[:2].upper() + "-01"
    a.as_("security-officer-1").admin.EscrowRollbackCertificates(
        pb.EscrowRollbackCertificatesRequest(
            smso_id="SMSO-R", group_id="EA", chf_identifiers=[chf],
            certificates=[certs.der(ca)],
            valid_from=pb.Date(year=(today - dt.timedelta(days=1)).year,
                               month=(today - dt.timedelta(days=1)).month,
                               day=(today - dt.timedelta(days=1)).day),
            valid_to=pb.Date(year=today.year + 1, month=1, day=1),
            constraints=pb.EscrowConstraints(max_releases=1)))
    req = pb.ReleaseRollbackCertificatesRequest(chf_identifier=chf, reason="rollback")
    out = _concurrently(lambda: a.as_("s1sp").s1sp.ReleaseRollbackCertificates(req),
                        lambda: b.as_("s1sp").s1sp.ReleaseRollbackCertificates(req))
    released = [o for o in out if not isinstance(o, grpc.RpcError)]
    refused = [error_reason(o) for o in out if isinstance(o, grpc.RpcError)]
    assert len(released) == 1 and refused == ["ESCROW_EXHAUSTED"]


def test_audit_log_of_two_replicas_is_one_valid_chain(replicas):
    a, b, _, _ = replicas
    for srv in (a, b, a, b):
        srv.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
    v = b.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert v.intact and v.events_checked >= 4
    v = a.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert v.intact
