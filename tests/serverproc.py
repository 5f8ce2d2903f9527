"""A real `keysvc serve` process for end-to-end tests, and ways to drive it.

The server runs as its own process with its own state directory (and so its own SoftHSM2
tokens), exactly as `make run` starts it; tests talk to it over mTLS with the role
certificates the server made.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import Stubs, connect

ROOT = Path(__file__).resolve().parent.parent
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


_STARTED: list[subprocess.Popen] = []


@atexit.register
def _stop_leftovers() -> None:
    """A test that failed before stopping its server must not leave it running."""
    for proc in _STARTED:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KEYSVC_") and k != "SOFTHSM2_CONF"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


@dataclass
class Server:
    state_dir: Path
    target: str
    proc: subprocess.Popen
    log_path: Path
    _stubs: dict[str, Stubs] = field(default_factory=dict)

    def as_(self, identity: str) -> Stubs:
        if identity not in self._stubs:
            self._stubs[identity] = connect(self.target, self.state_dir, identity)
        return self._stubs[identity]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        for s in self._stubs.values():
            s.channel.close()
        if self.proc.poll() is None:
            # The whole process group: a wrapper (faketime) does not pass signals on.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    # ------------------------------------------------------------------ key ceremony
    def import_aes_key(self, name: str, key: bytes, *, purpose: str, owner_id: str,
                       owner_type: str = "SMSO") -> None:
        """Officer 1 imports through an import job, officer 2 approves."""
        from tests.support.encoder import kcv
        o1, o2 = self.as_("security-officer-1").admin, self.as_("security-officer-2").admin
        job = o1.CreateImportJob(pb.CreateImportJobRequest(
            name=f"job {name}", purpose=pb.KeyPurpose.Value(purpose)))
        wrapped = serialization.load_pem_public_key(job.public_key_pem.encode()).encrypt(
            key, OAEP)
        op = o1.ImportTransportKey(pb.ImportTransportKeyRequest(
            name=name, purpose=pb.KeyPurpose.Value(purpose), owner_id=owner_id,
            owner_type=pb.OwnerType.Value(owner_type), expected_kcv=kcv(key),
            wrapped_key=wrapped, import_job_id=job.import_job_id))
        o2.ApproveOperation(pb.ApproveOperationRequest(operation_id=op.operation_id,
                                                       request_digest=op.request_digest))

    def keyed_file(self, prefix: str, originator_id: str, installs: list, file_id: str
                   ) -> tuple[bytes, list[bytes]]:
        """PREFIX-S1SP and PREFIX-DCO transport keys imported under dual control, and a
        file of `installs` under them: (the file, the two transport keys)."""
        from tests.support import encoder
        s1sp_kek, dco_kek = os.urandom(32), os.urandom(32)
        self.import_aes_key(f"{prefix}-S1SP", s1sp_kek, purpose="S1SP_TRANSPORT",
                            owner_id=originator_id)
        self.import_aes_key(f"{prefix}-DCO", dco_kek, purpose="DCO_TRANSPORT",
                            owner_id=originator_id)
        data = encoder.build_file(installs, file_id=file_id, originator_id=originator_id,
                                  s1sp_key_name=f"{prefix}-S1SP", s1sp_kek=s1sp_kek,
                                  dco_key_name=f"{prefix}-DCO", dco_kek=dco_kek)
        return data, [s1sp_kek, dco_kek]

    def enroll(self, certificate_pem: bytes, name: str = "") -> pb.Operation:
        """Officer 1 requests the enrolment of a certificate's key, officer 2 approves."""
        o1, o2 = self.as_("security-officer-1").admin, self.as_("security-officer-2").admin
        op = o1.EnrollOfficer(pb.EnrollOfficerRequest(certificate_pem=certificate_pem.decode(),
                                                      display_name=name))
        return o2.ApproveOperation(pb.ApproveOperationRequest(
            operation_id=op.operation_id, request_digest=op.request_digest))

    def load_rsa_key(self, name: str, pem_path: Path, *, purpose: str,
                     originators: list[str]) -> None:
        """Published test RSA keys go straight into the server's token (no API imports a
        private key: production recipient keys are generated in the HSM)."""
        subprocess.run([sys.executable, "-m", "tests.load_rsa_key", str(self.state_dir), name,
                        str(pem_path), purpose, *originators],
                       env=server_env(), check=True, cwd=ROOT, capture_output=True)

    def has_key(self, name: str) -> bool:
        import grpc
        try:
            self.as_("security-officer-1").admin.GetKey(pb.GetKeyRequest(name=name))
            return True
        except grpc.RpcError:
            return False

    def load_example_keys(self, example_dir: Path, expect: dict) -> None:
        """Idempotent: modules sharing the session server may each ask for the same keys."""
        if all(self.has_key(expect[f]["name"])
               for f in ("s1sp_transport_key", "dco_transport_key")):
            return
        if expect["transport"] == "kw":
            for f, purpose in (("s1sp_transport_key", "S1SP_TRANSPORT"),
                               ("dco_transport_key", "DCO_TRANSPORT")):
                self.import_aes_key(expect[f]["name"], bytes.fromhex(expect[f]["hex"]),
                                    purpose=purpose, owner_id=expect["originator_id"])
        else:
            for f, pem, purpose in (("s1sp_transport_key", "s1sp_rsa.pem", "S1SP_TRANSPORT"),
                                    ("dco_transport_key", "dco_rsa.pem", "DCO_TRANSPORT")):
                self.load_rsa_key(expect[f]["name"], example_dir / pem, purpose=purpose,
                                  originators=[expect["originator_id"]])


def start_server(state_dir: Path, *, trust_anchors: list[Path] = (), env: dict | None = None,
                 argv_prefix: list[str] | None = None, timeout: float = 90) -> Server:
    """Start `keysvc serve` and wait for its `listening on` line."""
    state_dir.mkdir(parents=True, exist_ok=True)
    anchors = state_dir / "trust-anchors"
    anchors.mkdir(exist_ok=True)
    for i, a in enumerate(trust_anchors):
        (anchors / f"anchor-{i}.pem").write_bytes(Path(a).read_bytes())
    port = free_port()
    log_path = state_dir / f"server-{port}.log"
    log = open(log_path, "wb")
    cmd = [*(argv_prefix or []), sys.executable, "-m", "keysvc.cli", "serve", "--state-dir",
           str(state_dir), "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=server_env(env), start_new_session=True)
    _STARTED.append(proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log_path.read_text()}")
        if b"listening on" in log_path.read_bytes():
            return Server(state_dir, f"127.0.0.1:{port}", proc, log_path)
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
