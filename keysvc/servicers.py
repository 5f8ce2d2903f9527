"""Thin gRPC servicers: proto in, a domain function, proto out. No logic lives here."""
from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from keysvc import dco, escrow, keyadmin, memory, officers, s1sp
from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.api.v1 import keysvc_pb2_grpc as rpc
from keysvc.app import App, Caller
from keysvc.custody import rotation
from keysvc.device_certificate import CertificateVerdict, verify_device_certificate
from keysvc.domain import Problem
from keysvc.errors import error
from keysvc.results import GroupResult, MasterKeysResult
from keysvc.server import audit_target, current_caller

log = logging.getLogger("keysvc.servicers")


def _caller() -> Caller:
    return current_caller.get()


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def ts(t: dt.datetime | None) -> Timestamp | None:
    """A Timestamp, exact to the microsecond (a naive time is local, as astimezone reads
    it). By hand, not Timestamp.FromDatetime: a large file's results carry thousands."""
    if t is None:
        return None
    d = (t if t.utcoffset() is not None else t.astimezone()) - _EPOCH
    return Timestamp(seconds=d.days * 86400 + d.seconds, nanos=d.microseconds * 1000)


def from_ts(t: Timestamp) -> dt.datetime:
    return t.ToDatetime(tzinfo=dt.timezone.utc)


def date_pb(d: dt.date) -> pb.Date:
    return pb.Date(year=d.year, month=d.month, day=d.day)


def date_from(d: pb.Date) -> dt.date | None:
    if not d.year:
        return None
    try:
        return dt.date(d.year, d.month, d.day)
    except ValueError:
        return None


def problems_pb(problems: tuple[Problem, ...]) -> list[pb.Problem]:
    return [pb.Problem(code=p.code, message=p.message, field=p.field) for p in problems]


def verdict_pb(v: CertificateVerdict) -> pb.CertificateVerdict:
    return pb.CertificateVerdict(
        valid=v.valid, problems=problems_pb(v.problems), subject=v.subject, issuer=v.issuer,
        serial_hex=v.serial_hex, not_before=ts(v.not_before), not_after=ts(v.not_after),
        device_id=v.device_id, public_key_algorithm=v.public_key_algorithm)


# Responses of large files are built with `repeated.add(...)`, each field set once: for
# 20,000 DCO entries 10 ms instead of 70 with a list of messages passed to the constructor
# (upb copies each message into its parent). Enum values come from a dict, not Value().
_STATUS = {name: pb.EntryStatus.Value(name) for name in pb.EntryStatus.keys()}
_ROLE = {name: pb.DeviceKeyRole.Value(name) for name in pb.DeviceKeyRole.keys()}


def _add_problems(field: Any, problems: tuple[Problem, ...]) -> None:
    for p in problems:
        field.add(code=p.code, message=p.message, field=p.field)


def group_result_pb(r: GroupResult) -> pb.ProcessGroupInformationResponse:
    out = pb.ProcessGroupInformationResponse(
        migration_file_id=r.migration_file_id, group_id=r.group_id,
        originator_id=r.originator_id, accepted_count=r.accepted_count,
        rejected_count=r.rejected_count)
    add = out.installations.add
    for i in r.installations:
        m = add(chf_identifier=i.chf_identifier, status=_STATUS[i.status],
                esme_device_id=i.esme_device_id, gsme_device_id=i.gsme_device_id)
        _add_problems(m.problems, i.problems)
        add_key = m.keys.add
        for k in i.keys:
            add_key(device_id=k.device_id, role=_ROLE[k.role], name=k.name, kcv=k.kcv)
        if i.device_certificate is not None:
            m.device_certificate.CopyFrom(verdict_pb(i.device_certificate))
    return out


def master_keys_pb(r: MasterKeysResult) -> pb.MasterKeysResult:
    out = pb.MasterKeysResult(
        migration_file_id=r.migration_file_id, group_id=r.group_id,
        accepted_count=r.accepted_count, rejected_count=r.rejected_count)
    add = out.entries.add
    for e in r.entries:
        m = add(chf_identifier=e.chf_identifier, device_id=e.device_id,
                status=_STATUS[e.status], kcv=e.kcv)
        _add_problems(m.problems, e.problems)
    return out


def _file_target(data: bytes) -> None:
    """Name the file in the audit event before it is parsed, so that a refused file has a
    target too; marked "claimed" because nothing has checked it yet. A processed file's
    event names the MigrationFileID read by the parser instead (`_parsed_target`). A large
    file's processing can take seconds: its start is logged (size only), so that an
    operator sees a file being worked on, not just its end."""
    log.info("file received", extra={"code": str(len(data))})
    start = data.find(b"<MigrationFileID>")
    if start >= 0:
        end = data.find(b"</MigrationFileID>", start, start + 200)
        if end > 0:
            audit_target.set("claimed " + data[start + 17:end].decode("ascii", "replace")[:64])


def _parsed_target(result: GroupResult | MasterKeysResult) -> None:
    audit_target.set(result.migration_file_id)


def _enum_name(enum: Any, value: int, what: str) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        raise error("INVALID_REQUEST", f"{what} {value} is not a known value") from None


def _time(t: Timestamp, what: str) -> dt.datetime:
    try:
        return from_ts(t)
    except (ValueError, OverflowError, OSError):
        raise error("INVALID_REQUEST", f"{what} is not a representable time") from None


class S1SPServicer(rpc.S1SPServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    def ProcessGroupInformation(self, request: Any, context: grpc.ServicerContext) -> Any:
        _file_target(request.file)
        with memory.given_back_after(request.file):
            result = s1sp.process_group_information(self.app, _caller(), request.file)
            _parsed_target(result)
            response = group_result_pb(result)
            del result
        return response

    def VerifyPrepaymentKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.device_id)
        return pb.VerifyPrepaymentKeyResponse(match=s1sp.verify_prepayment_key(
            self.app, request.device_id, request.expected_kcv,
            _enum_name(pb.KcvMethod, request.kcv_method, "kcv_method")))

    def VerifyDeviceCertificate(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.chf_identifier)
        at = _time(request.at, "at") if request.HasField("at") else self.app.clock()
        return verdict_pb(verify_device_certificate(
            request.certificate, request.chf_identifier, self.app.trust,
            intermediates=list(request.intermediates), at=at))

    def ExportDeviceKeys(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(f"{request.device_id} -> {request.export_key_name}")
        keys = s1sp.export_device_keys(self.app, request.device_id,
                                       [_enum_name(pb.DeviceKeyRole, r, "role")
                                        for r in request.roles],
                                       request.export_key_name)
        return pb.ExportDeviceKeysResponse(keys=[
            pb.ExportedKey(role=pb.DeviceKeyRole.Value(k.role), name=k.name, kcv=k.kcv,
                           wrapped=k.wrapped) for k in keys])

    def ReleaseRollbackCertificates(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.chf_identifier)
        r = escrow.release(self.app, _caller(), request.chf_identifier, request.reason)
        return pb.ReleaseRollbackCertificatesResponse(
            escrow_id=r.escrow_id, certificates=list(r.certificates),
            valid_from=date_pb(r.valid_from), valid_to=date_pb(r.valid_to),
            releases_left=r.releases_left)


class DCOServicer(rpc.DCOServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    def ValidateMasterKeys(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._master_keys(request, store=False)

    def UnwrapMasterKeys(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._master_keys(request, store=True)

    def _master_keys(self, request: Any, *, store: bool) -> Any:
        _file_target(request.file)
        with memory.given_back_after(request.file):
            result = dco.process_master_keys(self.app, _caller(), request.file, store=store)
            _parsed_target(result)
            response = master_keys_pb(result)
            del result
        return response

    def VerifyMasterKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.device_id)
        return pb.VerifyMasterKeyResponse(match=dco.verify_master_key(
            self.app, request.device_id, request.expected_kcv,
            _enum_name(pb.KcvMethod, request.kcv_method, "kcv_method")))


# api.md names some responses by their RPC (GetKeyResponse, DisableKeyResponse, ...) where
# the proto also has the shared type (KeyInfo, Operation, Escrow): same fields, same numbers.
def _value(enum: Any, name: str) -> Any:
    """An enum's number; 0 (UNSPECIFIED) for a record shown as altered (no values)."""
    return enum.Value(name) if name in enum.keys() else 0


def request_pb(r: dict) -> Any:
    if not r:
        return pb.OperationRequest()
    return pb.OperationRequest(
        name=r["name"], purpose=_value(pb.KeyPurpose, r["purpose"]), algorithm=r["algorithm"],
        owner_id=r["owner_id"], owner_type=_value(pb.OwnerType, r["owner_type"]),
        expected_kcv=r["expected_kcv"], allowed_originators=list(r["allowed_originators"]),
        import_job_id=r["import_job_id"], from_components=r["from_components"],
        key_state=_value(pb.KeyInfo.State, r["key_state"]),
        key_purpose=_value(pb.KeyPurpose, r["key_purpose"]), key_kcv=r["key_kcv"],
        warnings=list(r["warnings"]), officer_name=r["officer_name"],
        fingerprint=r["fingerprint"], certificate_subject=r["certificate_subject"],
        reason=r["reason"])


def operation_pb(o: keyadmin.Operation, message: type = pb.Operation) -> Any:
    return message(operation_id=o.operation_id, state=_value(pb.Operation.State, o.state),
                   kind=o.kind, target=o.target, requested_by=o.requested_by,
                   approved_by=list(o.approved_by), quorum=o.quorum, message=o.message,
                   created_at=ts(o.created_at), seal_intact=o.seal_intact,
                   request=request_pb(o.request), request_digest=o.request_digest)


def key_pb(k: keyadmin.KeyInfo, message: type = pb.KeyInfo) -> Any:
    return message(name=k.name, purpose=_value(pb.KeyPurpose, k.purpose),
                   owner_id=k.owner_id, owner_type=_value(pb.OwnerType, k.owner_type),
                   algorithm=k.algorithm, kcv=k.kcv, state=_value(pb.KeyInfo.State, k.state),
                   created_at=ts(k.created_at), public_key_pem=k.public_key_pem,
                   allowed_originators=list(k.allowed_originators),
                   seal_intact=k.seal_intact)


def escrow_pb(e: escrow.Escrow, message: type = pb.Escrow) -> Any:
    return message(escrow_id=e.escrow_id, smso_id=e.smso_id, group_id=e.group_id,
                   chf_identifiers=list(e.chf_identifiers),
                   certificate_count=len(e.certificates),
                   valid_from=date_pb(e.valid_from), valid_to=date_pb(e.valid_to),
                   constraints=pb.EscrowConstraints(max_releases=e.max_releases, note=e.note),
                   releases=e.releases, revoked=e.revoked, deposited_by=e.deposited_by,
                   deposited_at=ts(e.deposited_at), seal_intact=e.seal_intact)


def _purpose(value: int) -> str:
    return "" if value == 0 else _enum_name(pb.KeyPurpose, value, "purpose")


class KeyAdministrationServicer(rpc.KeyAdministrationServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    def CreateImportJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.name)
        job = keyadmin.create_import_job(self.app, _caller(), request.name,
                                         _purpose(request.purpose))
        return pb.CreateImportJobResponse(import_job_id=job.import_job_id,
                                          public_key_pem=job.public_key_pem,
                                          expires_at=ts(job.expires_at))

    def ImportTransportKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.name)
        return operation_pb(keyadmin.import_transport_key(
            self.app, _caller(), name=request.name, purpose=_purpose(request.purpose),
            owner_id=request.owner_id,
            owner_type=_enum_name(pb.OwnerType, request.owner_type, "owner_type")
            if request.owner_type else "",
            expected_kcv=request.expected_kcv, wrapped_key=request.wrapped_key,
            import_job_id=request.import_job_id, component=request.component))

    def GenerateRecipientKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.name)
        return operation_pb(keyadmin.generate_recipient_key(
            self.app, _caller(), name=request.name, purpose=_purpose(request.purpose),
            allowed_originators=list(request.allowed_originators)))

    def GetOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.operation_id)
        return operation_pb(keyadmin.get_operation(self.app, request.operation_id),
                            pb.GetOperationResponse)

    def ApproveOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.operation_id)
        if not re.fullmatch(r"[0-9a-fA-F]{64}", request.request_digest):
            raise error("INVALID_REQUEST", "request_digest (64 hex digits) is required: "
                                           "approve the request GetOperation showed you")
        return operation_pb(keyadmin.approve(self.app, _caller(), request.operation_id,
                                             request.component, request.request_digest))

    def ListOperations(self, request: Any, context: grpc.ServicerContext) -> Any:
        state = "" if request.state == 0 else _enum_name(pb.Operation.State, request.state,
                                                         "state")
        return pb.ListOperationsResponse(operations=[
            operation_pb(o) for o in keyadmin.list_operations(self.app, state)])

    def ListKeys(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ListKeysResponse(keys=[key_pb(k) for k in keyadmin.list_keys(
            self.app, _purpose(request.purpose))])

    def GetKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.name)
        return key_pb(keyadmin.get_key(self.app, request.name), pb.GetKeyResponse)

    def _state(self, request: Any, kind: str, message: type) -> Any:
        audit_target.set(request.name)
        return operation_pb(keyadmin.change_key_state(self.app, _caller(), request.name, kind),
                            message)

    def DisableKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._state(request, "DISABLE_KEY", pb.DisableKeyResponse)

    def EnableKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._state(request, "ENABLE_KEY", pb.EnableKeyResponse)

    def DestroyKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._state(request, "DESTROY_KEY", pb.DestroyKeyResponse)

    def EscrowRollbackCertificates(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.smso_id)
        escrow_id = escrow.deposit(
            self.app, _caller(), smso_id=request.smso_id, group_id=request.group_id,
            chf_identifiers=list(request.chf_identifiers),
            certificates=list(request.certificates),
            valid_from=date_from(request.valid_from), valid_to=date_from(request.valid_to),
            max_releases=request.constraints.max_releases, note=request.constraints.note)
        audit_target.set(escrow_id)
        return pb.EscrowRollbackCertificatesResponse(escrow_id=escrow_id)

    def ListEscrows(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ListEscrowsResponse(escrows=[escrow_pb(e) for e in escrow.list_escrows(
            self.app, request.smso_id, request.chf_identifier)])

    def RevokeEscrow(self, request: Any, context: grpc.ServicerContext) -> Any:
        # The reason lives in the audit log (the escrow row only records that it is revoked).
        audit_target.set(f"{request.escrow_id}: {request.reason}"[:512])
        return escrow_pb(escrow.revoke(self.app, _caller(), request.escrow_id, request.reason),
                         pb.RevokeEscrowResponse)

    def EnrollOfficer(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.display_name[:64])
        return operation_pb(officers.enroll_officer(self.app, _caller(), request.certificate_pem,
                                                    request.display_name))

    def RemoveOfficer(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.display_name[:64])
        return operation_pb(officers.remove_officer(self.app, _caller(), request.display_name))

    def DenyCertificate(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.fingerprint[:64])
        return operation_pb(officers.deny_certificate(self.app, _caller(), request.fingerprint,
                                                      request.reason))

    def AllowCertificate(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(request.fingerprint[:64])
        return operation_pb(officers.allow_certificate(self.app, _caller(),
                                                       request.fingerprint))

    def RotateKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(f"{request.partition}/{request.key}"[:64])
        return operation_pb(rotation.request_rotation(self.app, _caller(), request.partition,
                                                      request.key))

    def DestroyKeyVersion(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(f"{request.partition}/{request.key}@v{request.version}"[:64])
        return operation_pb(rotation.request_destroy_version(
            self.app, _caller(), request.partition, request.key, request.version))

    def ListKeyVersions(self, request: Any, context: grpc.ServicerContext) -> Any:
        st = rotation.status(self.app, request.partition)
        return pb.ListKeyVersionsResponse(
            versions=[pb.KeyVersion(partition=v.partition, key=v.key, version=v.version,
                                    primary=v.primary, stored_keys=v.stored_keys,
                                    backed_up=v.backed_up) for v in st.versions],
            rewrap=[pb.RewrapProgress(partition=r.partition, remaining=r.remaining,
                                      done=r.done, rows_per_second=r.rows_per_second,
                                      flagged=r.flagged) for r in st.rewrap],
            backups=[pb.BackupState(partition=b.partition, backup_id=b.backup_id,
                                    time=ts(b.time)) for b in st.backups])

    def ListOfficers(self, request: Any, context: grpc.ServicerContext) -> Any:
        roster = officers.list_roster(self.app)
        return pb.ListOfficersResponse(
            officers=[pb.Officer(display_name=o.name, fingerprint=o.fingerprint,
                                 denied=roster.denial(o.fingerprint) is not None)
                      for o in roster.officers],
            denied=[pb.DeniedKey(fingerprint=d.fingerprint, reason=d.reason)
                    for d in roster.denied],
            quorum=self.app.settings.quorum,
            pending=[pb.PendingRosterChange(operation_id=x.op_id, kind=x.kind,
                                            fingerprint=x.fingerprint, display_name=x.name)
                     for x in roster.pending])


class AuditServicer(rpc.AuditServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    def ListAuditEvents(self, request: Any, context: grpc.ServicerContext) -> Any:
        token = request.page_token
        if token and not re.fullmatch(r"[0-9]{1,18}", token):
            raise error("INVALID_REQUEST", "page_token is not one this service gave out")
        after = int(token) if token else 0
        events, last = self.app.audit.list(
            since=_time(request.since, "since") if request.HasField("since") else None,
            actor=request.actor, action=request.action, page_size=request.page_size,
            after_seq=after)
        return pb.ListAuditEventsResponse(
            events=[pb.AuditEvent(id=e.id, time=ts(e.time), actor=e.actor, role=e.role,
                                  action=e.action, target=e.target, outcome=e.outcome,
                                  code=e.code, sequence=e.sequence) for e in events],
            next_page_token=str(last) if last else "")

    def ExportAuditEvents(self, request: Any, context: grpc.ServicerContext) -> Any:
        audit_target.set(f"since {request.since_sequence}")
        for c in self.app.audit.export(request.since_sequence, request.limit or 1000):
            e = c.event
            yield pb.ChainedAuditEvent(
                event=pb.AuditEvent(id=e.id, time=ts(e.time), actor=e.actor, role=e.role,
                                    action=e.action, target=e.target, outcome=e.outcome,
                                    code=e.code, sequence=e.sequence),
                prev_hash=c.prev_hash, hash=c.hash, mac=c.mac)

    def VerifyAuditLog(self, request: Any, context: grpc.ServicerContext) -> Any:
        v = self.app.audit.verify()
        return pb.VerifyAuditLogResponse(intact=v.intact, events_checked=v.events_checked,
                                         first_bad_event_id=v.first_bad_event_id,
                                         detail=v.detail)


def register_all(server: grpc.aio.Server, app: App) -> None:
    """The services of the partitions this process serves: a process of one organisation
    answers the other's service UNIMPLEMENTED (gRPC's answer for a service not there)."""
    if "s1sp" in app.partitions.tokens:
        rpc.add_S1SPServiceServicer_to_server(S1SPServicer(app), server)
    if "dco" in app.partitions.tokens:
        rpc.add_DCOServiceServicer_to_server(DCOServicer(app), server)
    rpc.add_KeyAdministrationServiceServicer_to_server(KeyAdministrationServicer(app), server)
    rpc.add_AuditServiceServicer_to_server(AuditServicer(app), server)
