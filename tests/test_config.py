"""Settings are checked before anything starts (issue 17, in part): a value out of range,
a missing file, a token that is not there, a development set-up listening beyond loopback
are refused with their reason, by `keysvc serve` and by `keysvc config check`."""
from __future__ import annotations

import subprocess
import sys

from tests.serverproc import ROOT, free_port, server_env, start_server


def _keysvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keysvc.cli", *args], env=server_env(
        {"COLUMNS": "300"}), cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_quorum_below_two_is_refused_with_its_reason(tmp_path):
    out = _keysvc("serve", "--state-dir", str(tmp_path), "--listen",
                  f"127.0.0.1:{free_port()}", "--config", str(_toml(tmp_path, "quorum = 1")))
    assert out.returncode == 2 and "quorum must be at least 2" in out.stderr


def test_a_value_of_the_wrong_type_is_named(tmp_path):
    out = _keysvc("config", "check", "--config", str(_toml(tmp_path, 'workers = "many"')))
    assert out.returncode == 2 and "setting workers" in out.stdout


def test_the_development_set_up_listens_on_loopback_only(tmp_path):
    out = _keysvc("serve", "--state-dir", str(tmp_path), "--listen", f"0.0.0.0:{free_port()}")
    assert out.returncode == 2 and "loopback" in out.stderr


def test_config_check_names_every_problem_and_passes_a_good_configuration(tmp_path):
    bad = _keysvc("config", "check", "--config", str(_toml(tmp_path, 'tls_cert = "/nope"')))
    assert bad.returncode == 2
    assert "/nope cannot be read" in bad.stdout and "tls_key is required" in bad.stdout
    good = _keysvc("config", "check", "--state-dir", str(tmp_path / "dev"))
    assert good.returncode == 0 and "configuration ok" in good.stdout
    import json
    as_json = _keysvc("config", "check", "--json", "--config",
                      str(_toml(tmp_path, 'tls_cert = "/nope"')))
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 2 and not report["ok"] and not report["development"]
    assert "/nope cannot be read" in report["problems"]


def test_config_check_names_a_token_that_is_not_there(tmp_path):
    state = tmp_path / "state"
    start_server(state).stop()  # a development state: tokens, PINs, PKI
    pki, pins = state / "pki", state / "hsm" / "pins"
    text = "\n".join([
        f'tls_cert = "{pki / "server.pem"}"', f'tls_key = "{pki / "server.key"}"',
        f'tls_client_ca = "{pki / "ca.pem"}"',
        *(f'{p}_pin_file = "{pins / (p + ".pin")}"' for p in ("s1sp", "dco", "admin")),
        'dco_token_label = "no-such-token"'])
    out = subprocess.run([sys.executable, "-m", "keysvc.cli", "config", "check", "--config",
                          str(_toml(tmp_path, text))], cwd=ROOT, capture_output=True, text=True,
                         env=server_env({"SOFTHSM2_CONF": str(state / "hsm" / "softhsm2.conf"),
                                         "COLUMNS": "300"}))
    assert out.returncode == 2 and "no token labelled 'no-such-token'" in out.stdout
    # `serve` makes the same check before it starts, and says the same (no traceback)
    served = subprocess.run([sys.executable, "-m", "keysvc.cli", "serve", "--config",
                             str(_toml(tmp_path, text)), "--listen", f"127.0.0.1:{free_port()}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=server_env({"SOFTHSM2_CONF": str(state / "hsm" / "softhsm2.conf"),
                                            "COLUMNS": "300"}))
    assert served.returncode == 2, served.stderr
    assert "no token labelled 'no-such-token'" in served.stderr
    assert "Traceback" not in served.stderr


def _toml(tmp_path, text: str):
    path = tmp_path / "keysvc.toml"
    path.write_text(text + "\n")
    return path


def test_cli_exit_codes_say_refused_usage_or_unreachable_and_json_is_one_object_a_line(
        tmp_path):
    import json
    srv = start_server(tmp_path / "cli")
    try:
        where = ["--state-dir", str(srv.state_dir), "--server", srv.target]
        refused = _keysvc("admin", "get-key", "NO-SUCH-KEY", *where)
        assert refused.returncode == 1 and "KEY_NOT_FOUND" in refused.stderr
        assert _keysvc("admin", "get-key", *where).returncode == 2  # usage
        listed = _keysvc("admin", "officers", "--json", *where)
        tables = [json.loads(x) for x in listed.stdout.splitlines()]
        assert tables[0]["rows"][0]["officer"].startswith("security-officer-")
    finally:
        srv.stop()
    gone = _keysvc("admin", "keys", "--state-dir", str(srv.state_dir), "--server",
                   f"127.0.0.1:{free_port()}")
    assert gone.returncode == 3 and "cannot reach keysvc" in gone.stderr


def test_the_development_loopback_rule_parses_addresses_and_covers_the_metrics_port():
    from keysvc import config
    assert config.problems(config.load(env={}, listen="127.0.0.1.attacker.example:50051"))
    assert config.problems(config.load(env={}, metrics_listen="0.0.0.0:9100"))
    assert not config.problems(config.load(env={}, listen="[::1]:50051",
                                           metrics_listen="localhost:9100"))


def test_audit_list_pages_with_a_token_or_all_at_once(tmp_path):
    import json
    srv = start_server(tmp_path / "pages")
    try:
        from keysvc.api.v1 import keysvc_pb2 as pb
        for _ in range(5):
            srv.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
        where = ["--state-dir", str(srv.state_dir), "--server", srv.target, "--as", "auditor"]
        first = _keysvc("audit", "list", "--limit", "2", "--json", *where)
        assert first.returncode == 0 and "next page: --page-token" in first.stderr
        token = first.stderr.split("--page-token", 1)[1].split()[0]
        second = _keysvc("audit", "list", "--limit", "2", "--page-token", token, "--json",
                         *where)
        seqs = [r["#"] for x in (first, second) for line in x.stdout.splitlines()
                for r in json.loads(line)["rows"]]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4
        everything = _keysvc("audit", "list", "--limit", "2", "--all", "--json", *where)
        assert len(everything.stdout.splitlines()) >= 3
    finally:
        srv.stop()


def test_a_deployment_configured_only_by_variables_does_not_run_the_development_set_up(
        tmp_path):
    """Issue 17: KEYSVC_* settings that name a deployment (TLS files, PINs, module, token
    labels) are a configuration; the local CA and PIN files are not made, and what is missing
    is named."""
    from keysvc import config
    assert config.load(env={}).dev  # api.md: no configuration at all is the development set-up
    deployed = config.load(env={"KEYSVC_TLS_CERT": "/etc/keysvc/server.pem"})
    assert not deployed.dev
    assert any("tls_key is required" in p for p in config.problems(deployed))
    # the development set-up makes its own identity: asked for with one, it is refused
    mixed = config.load(env={"KEYSVC_TLS_CERT": "/x", "KEYSVC_DEV": "on"})
    assert any("makes its own tls_cert" in p for p in config.problems(mixed))
    out = subprocess.run([sys.executable, "-m", "keysvc.cli", "serve", "--state-dir",
                          str(tmp_path), "--listen", f"127.0.0.1:{free_port()}"], cwd=ROOT,
                         env=server_env({"KEYSVC_S1SP_PIN_FILE": "/nonexistent/s1sp.pin"}),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "tls_cert is required" in out.stderr
    assert not (tmp_path / "pki").exists()


def test_dev_is_explicit_when_asked_for_and_make_run_asks_for_it():
    from keysvc import config
    # a database, audit sink or trust anchors alone are a configuration: no development
    # set-up (it would mint officers against that database) unless asked for
    for name in ("KEYSVC_DATABASE_URL", "KEYSVC_AUDIT_DIR", "KEYSVC_TRUST_ANCHORS_DIR"):
        assert not config.load(env={name: "x"}).dev
    assert config.load(env={"KEYSVC_DATABASE_URL": "postgresql://x", "KEYSVC_DEV": "1"}).dev
    assert config.load(env={"KEYSVC_LISTEN": "127.0.0.1:1", "KEYSVC_LOG_LEVEL": "DEBUG"}).dev
    assert "serve --dev" in (ROOT / "Makefile").read_text()


def test_dev_refuses_a_configuration_file_and_an_empty_config_variable(tmp_path):
    import pytest

    from keysvc import config
    with pytest.raises(ValueError, match="cannot run with a configuration file"):
        config.load(str(_toml(tmp_path, "quorum = 2")), env={"KEYSVC_DEV": "on"})
    with pytest.raises(ValueError, match="KEYSVC_CONFIG is set but empty"):
        config.load(env={"KEYSVC_CONFIG": ""})


def test_traces_go_in_the_clear_only_to_a_loopback_collector():
    from keysvc import config

    def bad(endpoint: str) -> bool:
        return any("otlp_endpoint" in p for p in config.problems(
            config.load(env={}, otlp_endpoint=endpoint)))
    assert not bad("http://127.0.0.1:4317") and not bad("https://collector.example:4317")
    assert bad("http://collector.example:4317") and bad("collector:4317")


def test_booleans_read_on_and_off_and_refuse_anything_else():
    from keysvc import config
    assert config.load(env={"KEYSVC_DEV": "on"}).dev is True
    assert config.load(env={"KEYSVC_DEV": "off"}).dev is False
    import pytest
    with pytest.raises(ValueError, match="setting dev is not a bool"):
        config.load(env={"KEYSVC_DEV": "maybe"})


def test_new_tokens_never_adopt_a_database_that_holds_records(tmp_path):
    """A development set-up pointed at a deployment's database (or a token directory lost
    beside its database) must not start: its new keys would MAC events into that chain and
    leave every stored key unwrappable. The database is left as it was."""
    import sqlite3

    import pytest

    from keysvc.api.v1 import keysvc_pb2 as pb
    real = start_server(tmp_path / "real")
    real.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
    real.stop()
    db = tmp_path / "real" / "keysvc.db"

    def events() -> int:
        return sqlite3.connect(db).execute("SELECT count(*) FROM audit_events").fetchone()[0]
    before = events()
    for _ in range(2):  # and the refused start made nothing that lets the next one in
        with pytest.raises(RuntimeError, match="token is new .* holds its records"):
            start_server(tmp_path / "other", env={"KEYSVC_DATABASE_URL": f"sqlite:///{db}",
                                                   "KEYSVC_DEV": "on"})
    assert events() == before
    again = start_server(tmp_path / "real")
    try:
        verdict = again.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())
        assert verdict.intact
    finally:
        again.stop()


def test_an_audit_commit_delay_over_a_tenth_of_the_audit_timeout_is_refused():
    """A batch that waited longer would fail its callers closed for waiting."""
    from keysvc import config
    bad = config.problems(config.load(env={}, audit_commit_delay_ms=600.0))
    assert any("audit_commit_delay_ms" in p for p in bad)
    assert not [p for p in config.problems(config.load(env={}, audit_commit_delay_ms=0.0))
                if "audit_commit_delay_ms" in p]
