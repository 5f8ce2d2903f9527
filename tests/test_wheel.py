"""The wheel (issue 17): built from a checkout without generated code, installed into a
fresh virtualenv without the server's extra, its client used by an S1SP and a DCO program
against a real server.

setup.py generates the gRPC code at build time; the runtime dependencies are what the
runtime imports (grpcio-tools and pyasn1 are not among them).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serverproc import ROOT

CALLER = r'''
import sys
import keysvc
from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import Client, DeviceKeyNotFound, MalformedXml

target, pki = sys.argv[1], sys.argv[2]
assert keysvc.__file__.startswith(sys.prefix), keysvc.__file__   # the installed wheel
s1sp = Client.from_files(target, ca=f"{pki}/ca.pem", cert=f"{pki}/s1sp.pem",
                         key=f"{pki}/s1sp.key", server_name="localhost")
try:
    s1sp.s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
        device_id="10-5B-77-0C-A9-80-36-FF", expected_kcv="8504AFD9DD"))
except DeviceKeyNotFound as e:
    print("s1sp", type(e).__name__, bool(e.request_id))
dco = Client.from_files(target, ca=f"{pki}/ca.pem", cert=f"{pki}/dco.pem",
                        key=f"{pki}/dco.key", server_name="localhost")
try:
    dco.dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=b"<not-a-migration-file"))
except MalformedXml as e:
    print("dco", type(e).__name__, bool(e.request_id))
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.split(b"\0")
    for name in filter(None, tracked):
        path = Path(os.fsdecode(name))
        if (ROOT / path).is_file():
            (src / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, src / path)
    assert not (src / "keysvc/api/v1/keysvc_pb2.py").exists()  # generated, not committed
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(work / "dist"), str(src)], check=True, timeout=300)
    return next((work / "dist").glob("keysvc-*.whl"))


def test_the_wheel_carries_the_generated_code_and_the_type_marker(wheel):
    import zipfile
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"keysvc/api/v1/keysvc_pb2.py", "keysvc/api/v1/keysvc_pb2_grpc.py",
            "keysvc/py.typed"} <= names


def test_the_runtime_needs_neither_grpcio_tools_nor_pyasn1(wheel):
    import zipfile
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("/METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any("grpcio-tools" in r or "pyasn1" in r for r in requires), requires


@pytest.fixture(scope="module")
def bare_venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel and no extra: what a calling program installs."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True,
                   timeout=600)
    return venv


def test_s1sp_and_dco_programs_use_the_installed_client_against_a_real_server(
        bare_venv, server, tmp_path):
    venv = bare_venv
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([str(venv / "bin" / "python"), "-c", CALLER, server.target,
                          str(server.state_dir / "pki")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["s1sp DeviceKeyNotFound True",
                                          "dco MalformedXml True"]
    # The bare wheel is the client: none of the server's dependencies came with it, the
    # CLI's calls work, and serving says what to install.
    from keysvc.cli import SERVER_MODULES
    absent = subprocess.run([str(venv / "bin" / "python"), "-c", SERVER_ONLY,
                             *sorted(SERVER_MODULES)], env=env, capture_output=True,
                            text=True, timeout=60)
    assert absent.returncode == 0 and absent.stdout.split() == sorted(SERVER_MODULES), \
        absent.stdout + absent.stderr
    keysvc = str(venv / "bin" / "keysvc")
    pki = server.state_dir / "pki"
    called = subprocess.run([keysvc, "admin", "keys", "--server", server.target, "--ca",
                             str(pki / "ca.pem"), "--cert", str(pki / "security-officer-1.pem"),
                             "--key", str(pki / "security-officer-1.key"), "--json"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    auditor = ["--server", server.target, "--ca", str(pki / "ca.pem"), "--cert",
               str(pki / "auditor.pem"), "--key", str(pki / "auditor.key")]
    exported = subprocess.run([keysvc, "audit", "export", *auditor], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert exported.returncode == 0 and exported.stdout.startswith("{"), exported.stderr
    sink = next((server.state_dir / "audit").glob("audit-*.jsonl"))
    verified = subprocess.run([keysvc, "audit", "verify", "--sink", str(sink), *auditor],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "server's dependencies" not in verified.stderr, verified.stderr
    imported = subprocess.run([str(venv / "bin" / "python"), "-c", CLIENT_SIDE], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    serving = subprocess.run([keysvc, "serve", "--state-dir", str(tmp_path / "s")], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert serving.returncode == 2 and "pip install 'keysvc[server]'" in serving.stderr


TYPED_CALLER = '''
from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import Client

client = Client.from_files("keysvc:50051", ca="ca.pem", cert="s1sp.pem", key="s1sp.key")
reply = client.s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(device_id="d"))
match: bool = reply.match
'''
WRONG_REQUEST = '''
reply = client.s1sp.VerifyPrepaymentKey(pb.VerifyMasterKeyRequest(device_id="d"))
'''
WRONG_FIELD = '''
kcv: str = client.dco.VerifyMasterKey(pb.VerifyMasterKeyRequest()).kcv
'''


def test_a_callers_type_checker_sees_every_rpcs_request_and_response(wheel, tmp_path):
    """The wheel is typed (py.typed, mypy-protobuf's stubs of the messages and the gRPC
    stubs): mypy, pointed at a fresh virtualenv holding `keysvc[typing]` (the client and
    grpcio's and protobuf's stubs), passes a right call and names a wrong request type and
    a field the response does not have."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[typing]"],
                   check=True, timeout=600)
    programs = {"right.py": TYPED_CALLER, "wrong_request.py": TYPED_CALLER + WRONG_REQUEST,
                "wrong_field.py": TYPED_CALLER + WRONG_FIELD}
    for name, text in programs.items():
        (tmp_path / name).write_text(text)

    def mypy(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mypy", "--python-executable",
                               str(venv / "bin" / "python"), "--cache-dir",
                               str(tmp_path / ".mypy"), name], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    right = mypy("right.py")
    assert right.returncode == 0, right.stdout
    wrong = mypy("wrong_request.py")
    assert wrong.returncode == 1 and "VerifyMasterKeyRequest" in wrong.stdout, wrong.stdout
    field = mypy("wrong_field.py")
    assert field.returncode == 1 and '"kcv"' in field.stdout, field.stdout


# What the CLI's client commands use besides keysvc.client: importable from the bare wheel.
CLIENT_SIDE = """
from keysvc.audit.chain import utc_text
from keysvc.audit.sinks import first_difference, read_lines
from keysvc.identity.certificates import fingerprint
"""

SERVER_ONLY = r'''
import importlib.util, sys
print("\n".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
'''
