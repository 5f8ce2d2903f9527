"""A gRPC client for the CLI, the tests and the benchmarks: mTLS from a state directory.

The identity is a certificate in DIR/pki (s1sp, dco, security-officer-1, ...), exactly as
other components would present theirs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from keysvc.api.v1 import keysvc_pb2_grpc as rpc


def channel(target: str, pki_dir: Path, identity: str | None,
            max_bytes: int = 256 * 1024 * 1024) -> grpc.Channel:
    ca = (pki_dir / "ca.pem").read_bytes()
    key = cert = None
    if identity:
        key = (pki_dir / f"{identity}.key").read_bytes()
        cert = (pki_dir / f"{identity}.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=cert)
    return grpc.secure_channel(target, creds, options=[
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes)])


@dataclass
class Stubs:
    channel: grpc.Channel

    @property
    def s1sp(self) -> rpc.S1SPServiceStub:
        return rpc.S1SPServiceStub(self.channel)

    @property
    def dco(self) -> rpc.DCOServiceStub:
        return rpc.DCOServiceStub(self.channel)

    @property
    def admin(self) -> rpc.KeyAdministrationServiceStub:
        return rpc.KeyAdministrationServiceStub(self.channel)

    @property
    def audit(self) -> rpc.AuditServiceStub:
        return rpc.AuditServiceStub(self.channel)


def connect(target: str, state_dir: Path, identity: str | None) -> Stubs:
    return Stubs(channel(target, Path(state_dir) / "pki", identity))


def error_reason(exc: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call ("" if it carries none)."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""
