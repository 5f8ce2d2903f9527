"""CLI habits (issue 17): any certificate through --cert/--key/--ca or KEYSVC_CERT/KEY/CA
and KEYSVC_ADDR, not only the development state directory's; bash completion."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.serverproc import ROOT, server_env


def keysvc(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keysvc.cli", *argv], cwd=ROOT,
                          env=server_env(env), capture_output=True, text=True, timeout=60)


def _officers(out: subprocess.CompletedProcess) -> list[dict]:
    assert out.returncode == 0, out.stderr
    return [r for line in out.stdout.splitlines() if line.startswith("{")
            for t in [json.loads(line)] if t["table"].startswith("officers") for r in t["rows"]]


def test_cert_key_and_ca_flags_name_the_identity(server, tmp_path):
    pki = server.state_dir / "pki"
    out = keysvc("admin", "officers", "--json", "--server", server.target,
                 "--state-dir", str(tmp_path),  # nothing there: the flags are used
                 "--cert", str(pki / "security-officer-1.pem"),
                 "--key", str(pki / "security-officer-1.key"), "--ca", str(pki / "ca.pem"),
                 "--server-name", "localhost")
    assert _officers(out)


def test_the_environment_names_server_and_identity(server, tmp_path):
    pki = server.state_dir / "pki"
    out = keysvc("admin", "officers", "--json", "--state-dir", str(tmp_path), env={
        "KEYSVC_ADDR": server.target, "KEYSVC_CERT": str(pki / "security-officer-2.pem"),
        "KEYSVC_KEY": str(pki / "security-officer-2.key"), "KEYSVC_CA": str(pki / "ca.pem"),
        "KEYSVC_SERVER_NAME": "localhost"})
    assert _officers(out)


def test_a_certificate_without_its_key_is_a_usage_error(server):
    out = keysvc("admin", "officers", "--server", server.target, "--cert",
                 str(server.state_dir / "pki" / "security-officer-1.pem"))
    assert out.returncode == 2 and "go together" in out.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("words,cword,expected", [
    (["keysvc", "admin", "rot"], 2, "rotate-key"),
    (["keysvc", "admin", "rotate-key", "--par"], 3, "--partition"),
    (["keysvc", "s1sp", "verify-p"], 2, "verify-prepayment"),
])
def test_bash_completion_completes_commands_and_options(words, cword, expected):
    script = keysvc("completion", "bash")
    assert script.returncode == 0
    shell = (f"{script.stdout}\nCOMP_WORDS=({' '.join(words)}); COMP_CWORD={cword}; "
             '_keysvc; echo "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True)
    assert out.stdout.split() == [expected], out.stderr


def test_no_two_options_of_a_command_share_a_destination():
    """An option added to every command (--key for the identity) must not silently take
    the value of a command's own option (import-key's --key-file)."""
    import argparse

    from keysvc.cli import build_parser
    clashes = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        seen: dict[str, list[str]] = {}
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, f"{path} {name}")
            elif a.option_strings:
                if a.dest in seen:
                    clashes.append((path, a.dest, seen[a.dest], a.option_strings))
                seen[a.dest] = a.option_strings
    walk(build_parser(), "keysvc")
    assert clashes == []
