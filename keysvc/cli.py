"""The `keysvc` command: `serve`, and client commands for officers, S1SP, DCO and auditors.

Client commands talk gRPC over mTLS like any other component, with a role certificate
from the state directory (`--as NAME` picks DIR/pki/NAME.pem).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import sys
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterable

import grpc
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

# Tables stay readable when piped or captured (rich would otherwise squeeze them to 80).
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

DEFAULT_IDENTITY = {"admin": "security-officer-1", "s1sp": "s1sp", "dco": "dco",
                    "audit": "auditor"}


# --------------------------------------------------------------------------- helpers
def _stubs(args: argparse.Namespace) -> Any:
    """keysvc.client's Client (deadlines, retries of idempotent calls, typed errors) as the
    caller's identity: --cert/--key/--ca (or KEYSVC_CERT/KEY/CA), else a certificate of the
    development state directory (--as, or the group's default)."""
    from keysvc.client import Client
    files = (args.tls_cert, args.tls_key, args.tls_ca)
    try:
        if any(files):
            if not all(files):
                raise ValueError("--cert, --key and --ca (KEYSVC_CERT, KEYSVC_KEY, "
                                 "KEYSVC_CA) go together")
            ca, cert, key = (Path(f).read_bytes()
                             for f in (args.tls_ca, args.tls_cert, args.tls_key))
            return Client.from_pem(args.server, ca=ca, cert=cert, key=key,
                                   server_name=args.server_name or "")
        identity = args.as_ or DEFAULT_IDENTITY[args.group]
        return Client.for_identity(args.server, args.state_dir, identity)
    except (OSError, ValueError) as exc:  # a usage error: exit 2
        err.print(f"keysvc: {exc}", markup=False, highlight=False)
        raise SystemExit(2)


def shown(value: Any) -> Text:
    """A value from the server as plain text: never markup, and every control or format
    character (newlines, escape sequences, bidi overrides) shown escaped, so that no field
    can draw, hide or reorder what an officer reads."""
    return Text("".join(c if unicodedata.category(c)[0] != "C" else
                        c.encode("unicode_escape").decode("ascii")
                        for c in str(value)))


# Exit codes: 0 done, 1 refused by keysvc (its reason printed), 2 usage or configuration,
# 3 keysvc cannot be reached.
EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
# What `keysvc[server]` adds to the client's dependencies (top-level import names).
SERVER_MODULES = frozenset({"pkcs11", "lxml", "sqlalchemy", "alembic", "psycopg",
                            "prometheus_client", "Crypto", "asn1crypto", "opentelemetry",
                            "grpc_health", "grpc_reflection", "tzdata"})

# `--json`: every table is printed as one JSON object per line instead, for scripts.
_JSON = {"on": False}


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, bool)) or value is None else str(value)


def _table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> None:
    if _JSON["on"]:
        sys.stdout.write(json.dumps({"table": title, "rows": [
            dict(zip(columns, (_plain(x) for x in r))) for r in rows]}) + "\n")
        return
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[shown(x) for x in r])
    console.print(t)


def _files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.rglob("*.xml") if f.is_file())
    return [p]


def _date(text: str):
    from keysvc.api.v1 import keysvc_pb2 as pb
    d = dt.date.fromisoformat(text)
    return pb.Date(year=d.year, month=d.month, day=d.day)


def _fmt_date(d: Any) -> str:
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}" if d.year else ""


def _problems(problems: Iterable[Any]) -> str:
    return "; ".join(f"{p.code}" + (f" ({p.message})" if p.message else "") for p in problems)


# --------------------------------------------------------------------------- serve
DEV_HELP = ("the development set-up (local CA, SoftHSM2 tokens and PINs in the state "
            "directory); the default when there is no configuration at all")


def cmd_serve(args: argparse.Namespace) -> int:
    from keysvc import config, hardening
    from keysvc.app import App
    from keysvc.observability import configure_logging
    from keysvc.server import serve
    hardening.harden_early()  # before any PIN is read
    from keysvc import memory
    memory.fewer_heaps()
    hardening.keep_pins_out_of_environ()  # may re-execute this process without them
    pins: dict[str, Any] = hardening.pins_from_pipe()
    try:
        settings = config.load(args.config, state_dir=args.state_dir, listen=args.listen,
                               processes=args.processes, dev=args.dev or None,
                               partitions=args.partitions, **pins)
    except (ValueError, OSError) as exc:
        err.print(f"keysvc: configuration: {exc}", markup=False, highlight=False)
        return 2
    bad = config.problems(settings)
    if bad:
        for line in bad:
            err.print(f"keysvc: {line}", markup=False, highlight=False)
        return 2
    if not settings.dev and not _tokens_present(settings):
        return 2
    configure_logging(settings.log_level)
    if settings.dev:
        logging.getLogger("keysvc").warning(
            "development set-up: a local CA and PINs in files under %s; not for production "
            "(a deployment gives --config FILE)", settings.state_dir)
    hardening.harden(settings.lock_memory)
    if settings.processes == 1:
        from keysvc.hsm import HsmError
        try:
            app = App.open(settings)
        except HsmError as exc:  # a wrong PIN, a token gone: its label and kind, no secret
            err.print(f"keysvc: cannot start: {exc}", markup=False, highlight=False)
            return 1
        return serve(app, settings.listen)
    from keysvc import processes

    def start_worker(ready: Callable[[], None]) -> int:
        hardening.harden(settings.lock_memory)  # memory locks are not inherited by fork
        return serve(App.open(settings), settings.listen, on_ready=lambda _: ready(),
                     announce=False)
    def announce() -> None:
        from keysvc import notify
        print(f"listening on {settings.listen} ({settings.processes} processes)", flush=True)
        notify.notify("READY=1", f"STATUS=listening on {settings.listen} "
                                 f"({settings.processes} processes)")
    return processes.supervise(settings.processes, start_worker, announce)


def cmd_config_check(args: argparse.Namespace) -> int:
    """The checks `keysvc serve` makes before it starts, without serving; with a
    configuration file, also that the PKCS#11 module shows the three token labels."""
    from keysvc import config
    try:
        settings = config.load(args.config, state_dir=args.state_dir, dev=args.dev or None)
    except (ValueError, OSError) as exc:
        console.print(shown(f"problem: configuration: {exc}"), soft_wrap=True)
        return 2
    bad = config.problems(settings)
    import importlib.util
    absent = sorted(m for m in SERVER_MODULES if importlib.util.find_spec(m) is None)
    if absent:
        bad.append(f"the server's dependencies are not installed ({', '.join(absent)}): "
                   f"pip install 'keysvc[server]'")
    if not bad and not settings.dev:
        bad = _missing_tokens(settings)
    if _JSON["on"]:
        sys.stdout.write(json.dumps({"ok": not bad, "development": settings.dev,
                                     "problems": bad}) + "\n")
        return 2 if bad else 0
    for line in bad:
        console.print(shown(f"problem: {line}"), soft_wrap=True)
    if not bad:
        console.print("configuration ok" + (" (development set-up)" if settings.dev else ""))
    return 2 if bad else 0


TOKEN_CHECK_SECONDS = 60


def _tokens_present(settings: Any) -> bool:
    """`config check`'s token check before serving, in a child process: the PKCS#11 module
    must not be initialised in a process that then forks its workers."""
    pid = os.fork()
    if pid == 0:  # the child: report, and leave without running the parent's clean-ups
        code = 3  # anything unforeseen fails the check
        try:
            signal.alarm(TOKEN_CHECK_SECONDS)  # a PKCS#11 module that hangs
            missing = _missing_tokens(settings)
            for line in missing:
                err.print(f"keysvc: {line}", markup=False, highlight=False)
            code = 2 if missing else 0
        except BaseException as exc:
            err.print(f"keysvc: the token check failed ({type(exc).__name__})", markup=False,
                      highlight=False)
        finally:
            sys.stderr.flush()
            os._exit(code)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status < 0:
        err.print(f"keysvc: the token check was ended by signal {-status} (the PKCS#11 "
                  f"module crashed or hung for {TOKEN_CHECK_SECONDS} s)", markup=False,
                  highlight=False)
    return status == 0


def _missing_tokens(settings: Any) -> list[str]:
    import pkcs11

    from keysvc.hsm import HsmUnavailable
    from keysvc.hsm.store_lock import for_tokens
    tokens = for_tokens(settings.pkcs11_module, timeout=15.0)
    try:  # C_Initialize and the token list read every token's file (store_lock.py)
        with tokens.shared():
            labels = {t.label for t in pkcs11.lib(settings.pkcs11_module).get_tokens()}
    except HsmUnavailable as exc:  # the token list busy, or its lock file unusable
        return [str(exc)]
    except Exception as exc:
        return [f"the PKCS#11 module cannot be loaded ({type(exc).__name__})"]
    finally:
        tokens.close()
    return [f"no token labelled {settings.token_label(p)!r} ({p} partition)"
            for p in settings.served if settings.token_label(p) not in labels]


def cmd_init(args: argparse.Namespace) -> int:
    from keysvc import config
    from keysvc.app import App
    settings = config.load(args.config, state_dir=args.state_dir, dev=args.dev or None)
    App.open(settings).close()
    console.print(f"state directory ready: {settings.state_dir}")
    return 0


# --------------------------------------------------------------------------- admin
def _op_row(op: Any) -> list[Any]:
    from keysvc.api.v1 import keysvc_pb2 as pb
    return [op.operation_id, op.kind, op.target, pb.Operation.State.Name(op.state),
            op.requested_by, ", ".join(op.approved_by), f"{len(op.approved_by)}/{op.quorum}",
            op.message]


OP_COLUMNS = ["operation", "kind", "target", "state", "requested by", "approved by",
              "quorum", "message"]


def cmd_admin_import_key(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from keysvc.api.v1 import keysvc_pb2 as pb
    s = _stubs(args)
    req = pb.ImportTransportKeyRequest(
        name=args.name, purpose=pb.KeyPurpose.Value(args.purpose), owner_id=args.owner_id,
        owner_type=pb.OwnerType.Value(args.owner_type), expected_kcv=args.kcv)
    if args.component_file:
        req.component = bytes.fromhex(Path(args.component_file).read_text().strip())
    else:
        job = s.admin.CreateImportJob(pb.CreateImportJobRequest(
            name=f"import {args.name}", purpose=req.purpose))
        pub = serialization.load_pem_public_key(job.public_key_pem.encode())
        if not isinstance(pub, rsa.RSAPublicKey):
            raise SystemExit("keysvc: the import job's key is not an RSA key; nothing sent")
        key = bytes.fromhex(Path(args.key_file).read_text().strip())
        req.wrapped_key = pub.encrypt(key, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()),
                                                        algorithm=hashes.SHA1(), label=None))
        req.import_job_id = job.import_job_id
        del key
    op = s.admin.ImportTransportKey(req)
    _table("operation", OP_COLUMNS, [_op_row(op)])
    return 0


def _request_rows(op: Any) -> list[list[Any]]:
    """Every field of the request, as the approver must read it before approving."""
    from keysvc.api.v1 import keysvc_pb2 as pb
    r = op.request
    rows = [["operation", op.operation_id], ["kind", op.kind], ["key name", r.name],
            ["requested by", op.requested_by],
            ["approved by", ", ".join(op.approved_by)]]
    if op.kind in ("IMPORT_TRANSPORT_KEY", "GENERATE_RECIPIENT_KEY"):
        rows += [["purpose", pb.KeyPurpose.Name(r.purpose)], ["algorithm", r.algorithm]]
    if op.kind == "IMPORT_TRANSPORT_KEY":
        rows += [["owner", f"{r.owner_id} ({pb.OwnerType.Name(r.owner_type)})"],
                 ["expected KCV", r.expected_kcv],
                 ["key from", "officers' components" if r.from_components
                  else f"import job {r.import_job_id}"]]
    if op.kind == "GENERATE_RECIPIENT_KEY":
        rows.append(["allowed originators", ", ".join(r.allowed_originators)])
    if op.kind in ("ENROLL_OFFICER", "REMOVE_OFFICER"):
        rows[2] = ["officer", r.officer_name]
        rows.append(["key fingerprint", r.fingerprint])
    if op.kind == "ENROLL_OFFICER":
        rows.append(["certificate subject", r.certificate_subject])
    if op.kind in ("DENY_CERTIFICATE", "ALLOW_CERTIFICATE"):
        rows[2] = ["key fingerprint", r.fingerprint]
    if op.kind == "DENY_CERTIFICATE":
        rows.append(["reason", r.reason])
    if op.kind in ("DISABLE_KEY", "ENABLE_KEY", "DESTROY_KEY"):
        rows += [["key now", pb.KeyInfo.State.Name(r.key_state)],
                 ["key purpose", pb.KeyPurpose.Name(r.key_purpose)], ["key KCV", r.key_kcv]]
    rows.append(["request digest", op.request_digest])
    return [["WARNING", w] for w in r.warnings] + rows  # warnings first: nothing hides them


def cmd_admin_approve(args: argparse.Namespace) -> int:
    """Show the whole request and its digest, ask, then approve exactly that request."""
    from keysvc.api.v1 import keysvc_pb2 as pb
    s = _stubs(args)
    seen = s.admin.GetOperation(pb.GetOperationRequest(operation_id=args.operation_id))
    _table("the request you are approving", ["field", "value"], _request_rows(seen))
    if not seen.seal_intact:
        console.print("this operation fails its HSM seal: it cannot be approved")
        return 1
    if not args.yes:
        purpose = seen.request.purpose or seen.request.key_purpose
        what = shown(f"{seen.kind} of {seen.request.name or seen.target}"
                     + (f" ({pb.KeyPurpose.Name(purpose)})" if purpose else ""))
        console.print(Text.assemble("approve ", what, f", request {seen.request_digest[:16]}"
                                    f"{', with WARNINGS' if seen.request.warnings else ''}?"))
        answer = input("[y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            console.print("not approved")
            return 1
    comp = bytes.fromhex(Path(args.component_file).read_text().strip()) \
        if args.component_file else b""
    op = s.admin.ApproveOperation(pb.ApproveOperationRequest(
        operation_id=args.operation_id, component=comp,
        request_digest=seen.request_digest))
    _table("operation", OP_COLUMNS, [_op_row(op)])
    return 0


def cmd_admin_operations(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    r = _stubs(args).admin.ListOperations(pb.ListOperationsRequest(
        state=pb.Operation.State.Value(args.state or "STATE_UNSPECIFIED")))
    _table("operations", OP_COLUMNS, [_op_row(o) for o in r.operations])
    return 0


def _key_rows(keys: Iterable[Any]) -> list[list[Any]]:
    from keysvc.api.v1 import keysvc_pb2 as pb
    return [[k.name, pb.KeyPurpose.Name(k.purpose), k.algorithm, k.owner_id or
             ", ".join(k.allowed_originators), k.kcv, pb.KeyInfo.State.Name(k.state),
             k.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M")] for k in keys]


KEY_COLUMNS = ["name", "purpose", "algorithm", "owner / originators", "KCV", "state", "created"]


def cmd_admin_keys(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    r = _stubs(args).admin.ListKeys(pb.ListKeysRequest(
        purpose=pb.KeyPurpose.Value(args.purpose or "KEY_PURPOSE_UNSPECIFIED")))
    _table("keys", KEY_COLUMNS, _key_rows(r.keys))
    return 0


def cmd_admin_get_key(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    k = _stubs(args).admin.GetKey(pb.GetKeyRequest(name=args.name))
    _table("key", KEY_COLUMNS, _key_rows([k]))
    if k.public_key_pem:
        console.print(k.public_key_pem)
    return 0


def cmd_admin_generate(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    op = _stubs(args).admin.GenerateRecipientKey(pb.GenerateRecipientKeyRequest(
        name=args.name, purpose=pb.KeyPurpose.Value(args.purpose),
        allowed_originators=args.originator))
    _table("operation", OP_COLUMNS, [_op_row(op)])
    return 0


def cmd_admin_rotate(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    op = _stubs(args).admin.RotateKey(pb.RotateKeyRequest(partition=args.partition,
                                                          key=args.key_name))
    _table("operation", OP_COLUMNS, [_op_row(op)])
    return 0


def cmd_admin_destroy_version(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    op = _stubs(args).admin.DestroyKeyVersion(pb.DestroyKeyVersionRequest(
        partition=args.partition, key=args.key_name, version=args.version))
    _table("operation", OP_COLUMNS, [_op_row(op)])
    return 0


def cmd_admin_key_versions(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    r = _stubs(args).admin.ListKeyVersions(pb.ListKeyVersionsRequest(
        partition=args.partition or ""))
    _table("key versions", ["partition", "key", "version", "primary", "stored keys",
                            "backed up"],
           [[v.partition, v.key, v.version, "yes" if v.primary else "",
             v.stored_keys, "yes" if v.backed_up else "NO"] for v in r.versions])
    _table("backups", ["partition", "last backup", "backup id"],
           [[b.partition, b.time.ToDatetime().isoformat() + "Z" if b.HasField("time")
             else "never", b.backup_id] for b in r.backups])
    return 0


def cmd_admin_rewrap_status(args: argparse.Namespace) -> int:
    """Rows still on older storage-key versions, as a progress bar with an ETA; --watch
    follows it until nothing is left."""
    import time

    from keysvc.api.v1 import keysvc_pb2 as pb
    stub = _stubs(args).admin

    def read() -> dict:
        r = stub.ListKeyVersions(pb.ListKeyVersionsRequest(partition=args.partition or ""))
        totals: dict[str, int] = {}
        for v in r.versions:
            if v.key == "storage-key":
                totals[v.partition] = totals.get(v.partition, 0) + v.stored_keys
        return {w.partition: (w, totals.get(w.partition, 0)) for w in r.rewrap}
    now = read()
    if _JSON["on"] or not args.watch:
        rows = []
        for p, (w, total) in now.items():
            eta = w.remaining / w.rows_per_second if w.rows_per_second else None
            rows.append([p, total - w.remaining, total, w.remaining,
                         f"{w.rows_per_second:.0f}", f"{eta:.0f} s" if eta else "-",
                         w.flagged])
        _table("rewrap", ["partition", "on primary", "stored keys", "remaining", "rows/s",
                          "eta", "flagged"], rows)
        return 0
    with Progress(*Progress.get_default_columns(), console=console) as bar:
        tasks = {p: bar.add_task(f"rewrap {p}", total=max(total, 1),
                                 completed=total - w.remaining)
                 for p, (w, total) in now.items()}
        while any(w.remaining > w.flagged for w, _ in now.values()):
            time.sleep(args.interval)
            now = read()
            for p, (w, total) in now.items():
                bar.update(tasks[p], total=max(total, 1), completed=total - w.remaining)
    return 0


def cmd_admin_officers(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    r = _stubs(args).admin.ListOfficers(pb.ListOfficersRequest())
    _table(f"officers (quorum {r.quorum})", ["officer", "key fingerprint", "denied"],
           [[o.display_name, o.fingerprint, "DENIED" if o.denied else ""] for o in r.officers])
    _table("denied keys", ["key fingerprint", "reason"],
           [[d.fingerprint, d.reason] for d in r.denied])
    if r.pending:
        _table("waiting for their approval's commit (not counted yet)",
               ["operation", "kind", "key fingerprint", "officer"],
               [[x.operation_id, x.kind, x.fingerprint, x.display_name] for x in r.pending])
    return 0


def cmd_admin_enroll(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    op = _stubs(args).admin.EnrollOfficer(pb.EnrollOfficerRequest(
        certificate_pem=Path(args.certificate).read_text(), display_name=args.name or ""))
    _table("operation", OP_COLUMNS, [_op_row(op)])
    return 0


def cmd_admin_remove_officer(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    op = _stubs(args).admin.RemoveOfficer(pb.RemoveOfficerRequest(display_name=args.name))
    _table("operation", OP_COLUMNS, [_op_row(op)])
    return 0


def _fingerprint_arg(value: str) -> str:
    """A fingerprint, or a certificate file whose key's fingerprint is meant."""
    path = Path(value)
    if path.is_file():
        from cryptography import x509

        from keysvc.identity.certificates import fingerprint
        return fingerprint(x509.load_pem_x509_certificate(path.read_bytes()))
    return value


def cmd_admin_deny(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    op = _stubs(args).admin.DenyCertificate(pb.DenyCertificateRequest(
        fingerprint=_fingerprint_arg(args.key), reason=args.reason))
    _table("operation", OP_COLUMNS, [_op_row(op)])
    return 0


def cmd_admin_allow(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    op = _stubs(args).admin.AllowCertificate(pb.AllowCertificateRequest(
        fingerprint=_fingerprint_arg(args.key)))
    _table("operation", OP_COLUMNS, [_op_row(op)])
    return 0


def _key_state_cmd(rpc_name: str, request: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from keysvc.api.v1 import keysvc_pb2 as pb
        op = getattr(_stubs(args).admin, rpc_name)(getattr(pb, request)(name=args.name))
        _table("operation", OP_COLUMNS, [_op_row(op)])
        return 0
    return run


def _escrow_rows(escrows: Iterable[Any]) -> list[list[Any]]:
    return [[e.escrow_id, e.smso_id, e.group_id, ", ".join(e.chf_identifiers),
             e.certificate_count, _fmt_date(e.valid_from), _fmt_date(e.valid_to),
             f"{e.releases}/{e.constraints.max_releases or '∞'}",
             "yes" if e.revoked else "no", "yes" if e.seal_intact else "NO: altered",
             e.constraints.note] for e in escrows]


ESCROW_COLUMNS = ["escrow", "SMSO", "group", "CHFs", "certs", "from", "to", "released",
                  "revoked", "sealed", "note"]


def cmd_escrow_deposit(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    r = _stubs(args).admin.EscrowRollbackCertificates(pb.EscrowRollbackCertificatesRequest(
        smso_id=args.smso_id, group_id=args.group_id, chf_identifiers=args.chf,
        certificates=[Path(c).read_bytes() for c in args.certificate],
        valid_from=_date(args.valid_from), valid_to=_date(args.valid_to),
        constraints=pb.EscrowConstraints(max_releases=args.max_releases, note=args.note)))
    console.print(f"escrow_id: {r.escrow_id}")
    return 0


def cmd_escrow_list(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    r = _stubs(args).admin.ListEscrows(pb.ListEscrowsRequest(smso_id=args.smso_id or "",
                                                             chf_identifier=args.chf or ""))
    _table("escrows", ESCROW_COLUMNS, _escrow_rows(r.escrows))
    return 0


def cmd_escrow_revoke(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    e = _stubs(args).admin.RevokeEscrow(pb.RevokeEscrowRequest(escrow_id=args.escrow_id,
                                                               reason=args.reason))
    _table("escrow", ESCROW_COLUMNS, _escrow_rows([e]))
    return 0


# --------------------------------------------------------------------------- files
def _process_files(args: argparse.Namespace, call: Callable[[bytes], Any],
                   rows_of: Callable[[Path, Any], list[list[Any]]], columns: list[str],
                   title: str) -> int:
    from keysvc.client import KeysvcCallError
    files = _files(args.path)
    rows: list[list[Any]] = []
    failures = 0
    with Progress(console=err, transient=True, disable=len(files) < 2) as progress:
        task = progress.add_task("processing", total=len(files))
        for f in files:
            try:
                rows += rows_of(f, call(f.read_bytes()))
            except KeysvcCallError as exc:
                failures += 1
                rows.append([f.name, "", "FILE REJECTED", exc.reason or exc.status.name,
                             exc.message] + [""] * (len(columns) - 5))
            progress.advance(task)
    _table(title, columns, rows)
    accepted = sum(1 for r in rows if r[2] == "ACCEPTED")
    console.print(f"{len(files)} file(s): {accepted} accepted, {len(rows) - accepted} "
                  f"rejected, {failures} file(s) refused")
    return 1 if failures else 0


def cmd_s1sp_process(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    stub = _stubs(args).s1sp

    def rows(f: Path, r: Any) -> list[list[Any]]:
        return [[f.name, i.chf_identifier, pb.EntryStatus.Name(i.status),
                 ", ".join(p.code for p in i.problems), _problems(i.problems),
                 " ".join(f"{k.name[:4]}:{k.kcv}" for k in i.keys)] for i in r.installations]
    return _process_files(
        args, lambda data: stub.ProcessGroupInformation(
            pb.ProcessGroupInformationRequest(file=data)),
        rows, ["file", "CHF", "status", "codes", "problems", "key KCVs"], "installations")


def _dco_cmd(rpc_name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from keysvc.api.v1 import keysvc_pb2 as pb
        stub = _stubs(args).dco

        def rows(f: Path, r: Any) -> list[list[Any]]:
            return [[f.name, e.chf_identifier, pb.EntryStatus.Name(e.status),
                     ", ".join(p.code for p in e.problems), _problems(e.problems), e.device_id,
                     e.kcv] for e in r.entries]
        request = pb.UnwrapMasterKeysRequest if rpc_name == "UnwrapMasterKeys" \
            else pb.ValidateMasterKeysRequest
        return _process_files(args, lambda data: getattr(stub, rpc_name)(request(file=data)),
                              rows, ["file", "CHF", "status", "codes", "problems", "ESME",
                                     "KCV"], "master keys")
    return run


def _verdict_table(v: Any) -> None:
    rows = [["valid", "yes" if v.valid else "no"],
            ["problems", _problems(v.problems) or "-"], ["subject", v.subject or "(empty)"],
            ["issuer", v.issuer], ["serial", v.serial_hex],
            ["not before", v.not_before.ToDatetime().isoformat() if v.HasField("not_before")
             else ""],
            ["not after", v.not_after.ToDatetime().isoformat() if v.HasField("not_after")
             else "no expiry (99991231235959Z)"],
            ["device id", v.device_id], ["public key", v.public_key_algorithm]]
    _table("certificate verdict", ["field", "value"], rows)


def cmd_s1sp_verify_cert(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    v = _stubs(args).s1sp.VerifyDeviceCertificate(pb.VerifyDeviceCertificateRequest(
        certificate=Path(args.file).read_bytes(), chf_identifier=args.chf or "",
        intermediates=[Path(p).read_bytes() for p in args.intermediate]))
    _verdict_table(v)
    return 0 if v.valid else 1


def cmd_s1sp_verify_prepayment(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    r = _stubs(args).s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
        device_id=args.device_id, expected_kcv=args.kcv,
        kcv_method=pb.KcvMethod.Value(args.method)))
    console.print("match" if r.match else "no match")
    return 0 if r.match else 1


def cmd_s1sp_export(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    r = _stubs(args).s1sp.ExportDeviceKeys(pb.ExportDeviceKeysRequest(
        device_id=args.device_id, export_key_name=args.export_key,
        roles=[pb.DeviceKeyRole.Value(x) for x in args.role]))
    _table("exported keys (RFC 5649 under the export key)", ["role", "name", "KCV", "wrapped"],
           [[pb.DeviceKeyRole.Name(k.role), k.name, k.kcv, k.wrapped.hex().upper()]
            for k in r.keys])
    return 0


def cmd_s1sp_release(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    r = _stubs(args).s1sp.ReleaseRollbackCertificates(pb.ReleaseRollbackCertificatesRequest(
        chf_identifier=args.chf, reason=args.reason))
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for i, c in enumerate(r.certificates):
            (out / f"{r.escrow_id}-{i}.der").write_bytes(c)
    _table("released", ["escrow", "certificates", "from", "to", "releases left"],
           [[r.escrow_id, len(r.certificates), _fmt_date(r.valid_from), _fmt_date(r.valid_to),
             "unlimited" if r.releases_left < 0 else r.releases_left]])
    return 0


def cmd_dco_verify(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    r = _stubs(args).dco.VerifyMasterKey(pb.VerifyMasterKeyRequest(
        device_id=args.device_id, expected_kcv=args.kcv,
        kcv_method=pb.KcvMethod.Value(args.method)))
    console.print("match" if r.match else "no match")
    return 0 if r.match else 1


# --------------------------------------------------------------------------- audit
def cmd_audit_list(args: argparse.Namespace) -> int:
    """A page of events (--limit, from --page-token), or with --all every page in turn; the
    next page's token is printed on stderr when there is one."""
    from keysvc.api.v1 import keysvc_pb2 as pb
    stubs, token = _stubs(args), args.page_token or ""
    while True:
        r = stubs.audit.ListAuditEvents(pb.ListAuditEventsRequest(
            actor=args.actor or "", action=args.action or "", page_size=args.limit,
            page_token=token))
        _table("audit events", ["#", "time", "actor", "role", "action", "target", "outcome",
                                "code"],
               [[e.sequence, e.time.ToDatetime().isoformat(timespec="seconds"), e.actor,
                 e.role, e.action, e.target, e.outcome, e.code] for e in r.events])
        token = r.next_page_token
        if not token or not args.all:
            break
    if token:
        err.print(f"next page: --page-token {token}", markup=False, highlight=False)
    return 0


def _exported(stubs: Any, since: int, until: int = 0) -> Iterable[dict]:
    """The chain from the server (ExportAuditEvents, page by page), as sink lines."""
    from keysvc.api.v1 import keysvc_pb2 as pb
    from keysvc.audit.chain import utc_text
    while True:
        got = 0
        for c in stubs.audit.ExportAuditEvents(pb.ExportAuditEventsRequest(
                since_sequence=since, limit=10_000)):
            e = c.event
            got += 1
            since = e.sequence
            yield {"seq": e.sequence, "id": e.id, "time": utc_text(
                       e.time.ToDatetime().replace(tzinfo=dt.timezone.utc)),
                   "actor": e.actor, "role": e.role, "action": e.action, "target": e.target,
                   "outcome": e.outcome, "code": e.code, "prev_hash": c.prev_hash,
                   "hash": c.hash, "mac": c.mac}
            if until and since >= until:
                return
        if got < 10_000:  # caught up (each export is an event itself: never "empty")
            return


def cmd_audit_export(args: argparse.Namespace) -> int:
    """JSON lines for a SIEM, from a cursor: run again with --since the last `seq`."""
    try:
        for x in _exported(_stubs(args), args.since):
            sys.stdout.write(json.dumps(x, sort_keys=True, separators=(",", ":")) + "\n")
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        sys.stderr.close()
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from keysvc.api.v1 import keysvc_pb2 as pb
    stubs = _stubs(args)
    r = stubs.audit.VerifyAuditLog(pb.VerifyAuditLogRequest())
    rows = [["database chain", "yes" if r.intact else "NO", r.events_checked,
             r.first_bad_event_id or "-", r.detail or "-"]]
    ok = r.intact
    if args.sink:
        from keysvc.audit.sinks import first_difference, read_lines
        diff = first_difference(_exported(stubs, 0, r.events_checked),
                                read_lines(Path(args.sink)), upto=r.events_checked)
        rows.append([f"file {args.sink}", "NO" if diff else "yes", "-", "-", diff or "-"])
        ok = ok and not diff
    _table("audit log", ["checked", "intact", "events checked", "first bad event"],
           [r[:4] for r in rows])
    for r in rows:  # whole sentences, not wrapped in a table cell
        if r[4] != "-":
            console.print(shown(f"{r[0]}: {r[4]}"), soft_wrap=True)
    return 0 if ok else 1


def cmd_audit_new_chain(args: argparse.Namespace) -> int:
    """Break glass, on the server's machine with its configuration and PINs: go on after
    the database chain was found behind the HSM anchor; the first event says so."""
    from keysvc import config
    from keysvc.app import App
    settings = config.load(args.config, state_dir=args.state_dir)
    app = App.open(settings, recover_audit=False)  # intents wait for the new chain
    try:
        e = app.audit.new_chain(args.reason)
        app.audit.recover_intents(older_than=0)
        console.print(shown(f"new chain from sequence {e.sequence}: {e.target}"))
    finally:
        app.close()
    return 0


# --------------------------------------------------------------------------- custody
def _operator() -> str:
    import getpass
    return f"operator:{getpass.getuser()}"


def cmd_admin_backup(args: argparse.Namespace) -> int:
    """The backup ceremony, on the HSM's host with the PINs (keysvc/custody/backup.py)."""
    from cryptography import x509

    from keysvc import config
    from keysvc.app import App
    from keysvc.custody import backup as cb
    from keysvc.devstate import point_softhsm_at
    from keysvc.errors import KeysvcError
    from keysvc.hsm import HsmError, Token, TokenConfig
    from keysvc.identity.certificates import fingerprint
    settings = config.load(args.config, state_dir=args.state_dir)
    point_softhsm_at(settings)
    # A split configuration backs up its own partitions (their PINs are the ones it has).
    parts = list(settings.served) if args.partition == "all" else [args.partition]
    if set(parts) - set(settings.served):
        raise SystemExit(f"the {args.partition} partition is not among this configuration's "
                         f"partitions ({settings.partitions})")
    try:
        certs = [x509.load_pem_x509_certificate(Path(f).read_bytes()) for f in args.custodian]
    except (OSError, ValueError) as exc:
        raise SystemExit(f"a custodian certificate cannot be read: {exc}")
    # Checked before anything is made in a token: M of N, and N different keys.
    if len({fingerprint(c) for c in certs}) != len(certs):
        raise SystemExit("the same custodian is named twice: each share needs its own")
    if not 2 <= args.threshold <= len(certs):
        raise SystemExit(f"a backup needs 2 <= threshold <= custodians (got {args.threshold} "
                         f"of {len(certs)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prepared: dict = {}
    app = None
    try:
        for p in parts:  # as security officer, before this process logs in as user
            prepared[p] = cb.prepare(settings.pkcs11_module, settings.token_label(p),
                                     settings.so_pin(p), cb.new_id())
        app = App.open(settings, backup_ceremony=True)
        roster = app.roster.current()
        for c in certs:
            if roster.officer(fingerprint(c)) is None or roster.denial(fingerprint(c)):
                raise SystemExit(f"{c.subject.rfc4514_string()} is not an enrolled officer: "
                                 "custodians are enrolled like officers (dual control)")
        rows = []
        for p in parts:
            bid = prepared[p].backup_id
            try:
                b = cb.take(app.partitions.tokens[p], p, prepared[p], certs, args.threshold,
                            app.clock())
                files = {f"{p}-{bid}.backup": b.blob}
                for share in b.shares:
                    files[f"{p}-{bid}.share-{share.index}-{share.custodian[:12]}.json"] = \
                        share.to_json().encode()
                _write_durably(out, files)
                cb.record(app.partitions.tokens[p], b)  # only now does the token count it
            except (KeysvcError, HsmError, OSError) as exc:
                code = getattr(exc, "code", type(exc).__name__)
                app.audit.append(actor=_operator(), role="operator", action="custody.backup",
                                 target=f"{p} backup {bid}", outcome="FAILED", code=code)
                raise SystemExit(f"{p}: {code}: {getattr(exc, 'message', exc)}")
            app.audit.append(actor=_operator(), role="operator", action="custody.backup",
                             target=f"{p} backup {bid}: {args.threshold} of {len(certs)} "
                                    f"custodians, versions {json.dumps(b.versions)}")
            rows.append((p, bid, f"{args.threshold} of {len(certs)}",
                         ", ".join(f"{k} {v}" for k, v in b.versions.items())))
        _table("backups", ["partition", "backup id", "custodians", "key versions"], rows)
    except ValueError as exc:  # no SO PIN configured
        raise SystemExit(str(exc))
    finally:
        # Whatever happened: no secret kept, no backup key left in a token.
        for prep in prepared.values():
            prep.forget()
        for p, prep in prepared.items():
            token = app.partitions.tokens[p] if app is not None else Token(TokenConfig(
                module=settings.pkcs11_module, label=settings.token_label(p),
                pin=settings.pin(p)))
            try:
                cb.discard(token, prep.backup_id)
            except Exception as exc:
                err.print(f"keysvc: a backup key may be left in the {p} token (a start "
                          f"30 minutes later or more removes it): {type(exc).__name__}")
        if app is not None:
            app.close()
    return 0


def _write_durably(directory: Path, files: dict[str, bytes]) -> None:
    """Write, fsync and read back each file (and the directory entry): a backup counts
    only once it is on disk as written."""
    for name, data in files.items():
        path = directory / name
        # A new file of our own (no symlink followed, nothing overwritten), readable by us.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.read_bytes() != data:
            raise OSError(f"{path} does not read back as written")
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cmd_admin_restore(args: argparse.Namespace) -> int:
    """Restore a partition's keys into an empty token (the server stopped)."""
    import getpass

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from keysvc import config
    from keysvc.custody import backup as cb
    from keysvc.custody import shares as sh
    from keysvc.devstate import point_softhsm_at
    from keysvc.errors import KeysvcError
    from keysvc.hsm import Token, TokenConfig
    settings = config.load(args.config, state_dir=args.state_dir)
    point_softhsm_at(settings)
    p = args.partition
    token = Token(TokenConfig(module=settings.pkcs11_module, label=settings.token_label(p),
                              pin=settings.pin(p)))
    try:
        blob = Path(args.blob).read_bytes()
        header, _ = cb.header_of(blob)
        if args.backup_id and header["backup_id"] != args.backup_id:
            raise SystemExit(f"restore refused: this is backup {header['backup_id']} "
                             f"(made {header['created']}), not {args.backup_id}")
        opened = []
        for pair in args.share:
            share_file, _, key_file = pair.partition(":")
            if not key_file:
                raise SystemExit("--share takes SHARE_FILE:CUSTODIAN_KEY_FILE")
            share = sh.Share.from_json(Path(share_file).read_bytes())
            pem = Path(key_file).read_bytes()
            password = None
            if b"ENCRYPTED" in pem:  # each custodian types their own passphrase
                password = getpass.getpass(f"passphrase of {key_file}: ").encode()
            key = load_pem_private_key(pem, password=password)
            opened.append((share, sh.decrypt(share, key)))
        done = cb.restore(token, p, blob, opened)
    except KeysvcError as exc:
        raise SystemExit(f"restore refused: {exc.code}: {exc.message}")
    except (OSError, ValueError, TypeError) as exc:
        raise SystemExit(f"restore refused: {type(exc).__name__}: {exc}")
    finally:
        token.close()
    console.print(shown(f"{p}: restored {len(done.keys)} keys and {done.data_objects} data "
                        f"objects from backup {done.backup_id} made {done.created}; the next "
                        "start audits it. Restore every partition before starting keysvc."))
    return 0


# --------------------------------------------------------------------------- completion
def cmd_completion(args: argparse.Namespace) -> int:
    """`source <(keysvc completion bash)`: commands and options, from this parser."""
    sys.stdout.write(bash_completion(build_parser()))
    return 0


def bash_completion(parser: argparse.ArgumentParser) -> str:
    tree: dict[str, tuple[list[str], list[str]]] = {}

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        subs: list[str] = []
        opts: list[str] = []
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    subs.append(name)
                    walk(sp, f"{path} {name}".strip())
            else:
                opts.extend(o for o in a.option_strings if o.startswith("--"))
        tree[path] = (subs, opts)
    walk(parser, "")

    def cases(pick: Callable[[list[str], list[str]], list[str]]) -> str:
        return "\n".join(f'    "{path}") echo "{" ".join(pick(*v))}" ;;'
                         for path, v in sorted(tree.items()))
    return f"""# keysvc bash completion: source <(keysvc completion bash)
_keysvc_subs() {{
  case "$1" in
{cases(lambda subs, opts: subs)}
  esac
}}
_keysvc_words() {{
  case "$1" in
{cases(lambda subs, opts: subs + opts)}
  esac
}}
_keysvc() {{
  local cur="${{COMP_WORDS[COMP_CWORD]}}" path="" w
  for w in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
    case " $(_keysvc_subs "$path") " in
      *" $w "*) path="${{path:+$path }}$w" ;;
    esac
  done
  COMPREPLY=( $(compgen -W "$(_keysvc_words "$path")" -- "$cur") )
}}
complete -F _keysvc keysvc
"""


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keysvc", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--state-dir", default=os.environ.get("KEYSVC_STATE_DIR", ".keysvc"))

    serve = sub.add_parser("serve", help="run the gRPC server")
    common(serve)
    serve.add_argument("--listen", default=None)
    serve.add_argument("--processes", type=int, default=None,
                       help="server processes sharing the port (default 1; one per core "
                            "uses every core)")
    serve.add_argument("--config", default=None)
    serve.add_argument("--partitions", default=None,
                       help="the partitions this process serves, e.g. s1sp,admin or dco,admin "
                            "(default all): it reads only their PINs and logs in only to "
                            "their tokens")
    serve.add_argument("--dev", action="store_true", help=DEV_HELP)
    serve.set_defaults(func=cmd_serve)
    cc = sub.add_parser("config", help="configuration")
    ccs = cc.add_subparsers(dest="action", required=True)
    check = ccs.add_parser("check", help="validate the settings as `serve` would, and exit")
    common(check)
    check.add_argument("--config", default=None)
    check.add_argument("--dev", action="store_true", help=DEV_HELP)
    check.add_argument("--json", action="store_true", help="one JSON object: ok, problems")
    check.set_defaults(func=cmd_config_check)
    init = sub.add_parser("init", help="create the development state directory and exit")
    common(init)
    init.add_argument("--config", default=None)
    init.add_argument("--dev", action="store_true", help=DEV_HELP)
    init.set_defaults(func=cmd_init)

    def group(name: str, help_: str) -> Any:
        g = sub.add_parser(name, help=help_)
        gs = g.add_subparsers(dest="action", required=True)

        def cmd(action: str, func: Callable, help_: str = "") -> argparse.ArgumentParser:
            c = gs.add_parser(action, help=help_)
            common(c)
            c.add_argument("--server", default=os.environ.get(
                "KEYSVC_ADDR", os.environ.get("KEYSVC_SERVER", "127.0.0.1:50051")),
                help="host:port (KEYSVC_ADDR)")
            c.add_argument("--cert", dest="tls_cert", default=os.environ.get("KEYSVC_CERT"),
                           help="client certificate, PEM (KEYSVC_CERT)")
            c.add_argument("--key", dest="tls_key", default=os.environ.get("KEYSVC_KEY"),
                           help="its private key, PEM (KEYSVC_KEY)")
            c.add_argument("--ca", dest="tls_ca", default=os.environ.get("KEYSVC_CA"),
                           help="the CA that issued the server's certificate (KEYSVC_CA)")
            c.add_argument("--server-name", default=os.environ.get("KEYSVC_SERVER_NAME"),
                           help="the name the server's certificate must carry, if not the "
                                "host in --server (KEYSVC_SERVER_NAME)")
            c.add_argument("--json", action="store_true",
                           help="print results as JSON lines instead of tables")
            c.add_argument("--as", dest="as_", default=None,
                           help="identity certificate in STATE/pki (default per group)")
            c.set_defaults(func=func, group=name)
            return c
        return cmd

    admin = group("admin", "security-officer commands (dual control)")
    c = admin("import-key", cmd_admin_import_key, "import a transport key")
    c.add_argument("--name", required=True)
    c.add_argument("--purpose", required=True, choices=["S1SP_TRANSPORT", "DCO_TRANSPORT",
                                                        "EXPORT"])
    c.add_argument("--owner-id", required=True)
    c.add_argument("--owner-type", default="SMSO", choices=["SMSO", "REQUESTING_PARTY", "S1SP"])
    c.add_argument("--kcv", required=True, help="expected CMAC check value")
    m = c.add_mutually_exclusive_group(required=True)
    m.add_argument("--key-file", help="file with the key in hex: wrapped to a new import job")
    m.add_argument("--component-file", help="file with this officer's clear component in hex")
    c = admin("approve", cmd_admin_approve, "show a pending operation's whole request, "
              "ask, and approve exactly that request")
    c.add_argument("operation_id")
    c.add_argument("--component-file", default=None)
    c.add_argument("--yes", action="store_true", help="approve without asking (scripts)")
    c = admin("operations", cmd_admin_operations, "list operations")
    c.add_argument("--state", default=None, choices=["PENDING", "APPROVED", "REJECTED",
                                                     "EXPIRED"])
    c = admin("keys", cmd_admin_keys, "list keys")
    c.add_argument("--purpose", default=None)
    c = admin("get-key", cmd_admin_get_key, "show one key")
    c.add_argument("name")
    c = admin("generate-recipient-key", cmd_admin_generate, "RSA-3072 recipient key")
    c.add_argument("--name", required=True)
    c.add_argument("--purpose", required=True, choices=["S1SP_TRANSPORT", "DCO_TRANSPORT"])
    c.add_argument("--originator", action="append", required=True)
    for action, rpc_name, req in (("disable", "DisableKey", "DisableKeyRequest"),
                                  ("enable", "EnableKey", "EnableKeyRequest"),
                                  ("destroy", "DestroyKey", "DestroyKeyRequest")):
        admin(action, _key_state_cmd(rpc_name, req), f"{action} a key (dual control)") \
            .add_argument("name")
    rotatable = ("storage-key or component-seal (s1sp, dco); audit-mac or escrow-seal "
                 "(admin)")
    c = admin("rotate-key", cmd_admin_rotate, "a new version of a long-lived key, primary "
              "once approved (dual control)")
    c.add_argument("--partition", required=True, choices=["s1sp", "dco", "admin"])
    c.add_argument("--key-name", default="storage-key", help=rotatable)
    c = admin("destroy-key-version", cmd_admin_destroy_version, "destroy an old key version "
              "nothing uses (dual control)")
    c.add_argument("--partition", required=True, choices=["s1sp", "dco", "admin"])
    c.add_argument("--key-name", default="storage-key", help=rotatable)
    c.add_argument("--version", type=int, required=True)
    c = admin("key-versions", cmd_admin_key_versions, "every long-lived key version, the "
              "stored keys under each, and the last backup")
    c.add_argument("--partition", default=None, choices=["s1sp", "dco", "admin"])
    c = admin("rewrap-status", cmd_admin_rewrap_status, "the rewrap's progress and ETA")
    c.add_argument("--partition", default=None, choices=["s1sp", "dco"])
    c.add_argument("--watch", action="store_true", help="a progress bar until it is done")
    c.add_argument("--interval", type=float, default=2.0)
    admin("officers", cmd_admin_officers, "list enrolled officers and denied keys")
    c = admin("enroll-officer", cmd_admin_enroll, "enrol an officer's certificate key "
              "(dual control)")
    c.add_argument("certificate", help="the officer's certificate (PEM file)")
    c.add_argument("--name", default=None, help="display name (default: the CN)")
    c = admin("remove-officer", cmd_admin_remove_officer, "remove an officer (dual control)")
    c.add_argument("name")
    c = admin("deny", cmd_admin_deny, "deny a certificate key: refused on its next call "
              "(dual control)")
    c.add_argument("key", help="the key's SPKI SHA-256 fingerprint, or a certificate file")
    c.add_argument("--reason", required=True)
    c = admin("allow", cmd_admin_allow, "take a key off the deny list (dual control)")
    c.add_argument("key", help="the key's SPKI SHA-256 fingerprint, or a certificate file")
    c = admin("backup", cmd_admin_backup, "backup ceremony: every long-lived key version, "
              "M of N custodians (local, on the HSM's host, needs the PINs and SO PIN)")
    c.add_argument("--config", default=None)
    c.add_argument("--partition", required=True, choices=["s1sp", "dco", "admin", "all"])
    c.add_argument("--custodian", action="append", required=True,
                   help="an enrolled officer's certificate (PEM), once per custodian")
    c.add_argument("--threshold", type=int, required=True, help="shares needed (>= 2)")
    c.add_argument("--out", required=True, help="directory for the backup and the shares")
    c = admin("restore", cmd_admin_restore, "restore a partition's keys into an empty "
              "token from a backup and M shares (local, server stopped)")
    c.add_argument("--config", default=None)
    c.add_argument("--partition", required=True, choices=["s1sp", "dco", "admin"])
    c.add_argument("--blob", required=True, help="the .backup file")
    c.add_argument("--share", action="append", required=True,
                   help="SHARE_FILE:CUSTODIAN_KEY_FILE, once per custodian present")
    c.add_argument("--backup-id", default=None,
                   help="the backup expected (refused if the file is another, older one)")
    c = admin("escrow-deposit", cmd_escrow_deposit, "escrow rollback certificates")
    _escrow_deposit_args(c)
    c = admin("escrow-list", cmd_escrow_list, "list escrows")
    c.add_argument("--smso-id", default=None)
    c.add_argument("--chf", default=None)
    c = admin("escrow-revoke", cmd_escrow_revoke, "revoke an escrow")
    c.add_argument("escrow_id")
    c.add_argument("--reason", default="")

    s1 = group("s1sp", "S1SP commands")
    s1("process", cmd_s1sp_process, "ProcessGroupInformation for a file or directory") \
        .add_argument("path")
    c = s1("verify-cert", cmd_s1sp_verify_cert, "VerifyDeviceCertificate")
    c.add_argument("file")
    c.add_argument("--chf", default=None,
                   help="the CHF identifier it must name (without it the verdict is invalid)")
    c.add_argument("--intermediate", action="append", default=[])
    c = s1("verify-prepayment", cmd_s1sp_verify_prepayment, "VerifyPrepaymentKey")
    c.add_argument("device_id")
    c.add_argument("kcv")
    c.add_argument("--method", default="CMAC", choices=["CMAC", "ECB"])
    c = s1("export", cmd_s1sp_export, "ExportDeviceKeys")
    c.add_argument("device_id")
    c.add_argument("--export-key", required=True)
    c.add_argument("--role", action="append", default=[])
    c = s1("release-rollback", cmd_s1sp_release, "ReleaseRollbackCertificates")
    c.add_argument("chf")
    c.add_argument("--reason", required=True)
    c.add_argument("--out", default=None, help="directory to write the DER certificates to")

    dc = group("dco", "DCO commands")
    dc("validate", _dco_cmd("ValidateMasterKeys"), "ValidateMasterKeys").add_argument("path")
    dc("unwrap", _dco_cmd("UnwrapMasterKeys"), "UnwrapMasterKeys").add_argument("path")
    c = dc("verify", cmd_dco_verify, "VerifyMasterKey")
    c.add_argument("device_id")
    c.add_argument("kcv")
    c.add_argument("--method", default="CMAC", choices=["CMAC", "ECB"])

    au = group("audit", "auditor commands")
    c = au("list", cmd_audit_list, "ListAuditEvents")
    c.add_argument("--actor", default=None)
    c.add_argument("--action", default=None)
    c.add_argument("--limit", type=int, default=50, help="events per page (at most 1000)")
    c.add_argument("--page-token", default=None, help="go on from an earlier page")
    c.add_argument("--all", action="store_true", help="every page in turn")
    c = au("verify", cmd_audit_verify, "VerifyAuditLog; with --sink, also compare the "
           "chain with an audit file")
    c.add_argument("--sink", default=None, help="a JSON-lines audit file (rotated ones too)")
    c = au("export", cmd_audit_export, "the chained events as JSON lines (ExportAuditEvents)")
    c.add_argument("--since", type=int, default=0, help="the last sequence already held")
    c.add_argument("--format", default="jsonl", choices=["jsonl"])
    comp = sub.add_parser("completion", help="print a shell completion script: "
                          "source <(keysvc completion bash)")
    comp.add_argument("shell", choices=["bash"])
    comp.set_defaults(func=cmd_completion)
    nc = sub.add_parser("audit-new-chain", help="break glass: continue after the audit chain "
                        "was found behind the HSM anchor (local, needs the PINs)")
    nc.add_argument("--state-dir", default=os.environ.get("KEYSVC_STATE_DIR", ".keysvc"))
    nc.add_argument("--config", default=None)
    nc.add_argument("--reason", required=True)
    nc.set_defaults(func=cmd_audit_new_chain)
    return p


def _escrow_deposit_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--smso-id", required=True)
    c.add_argument("--group-id", default="EA")
    c.add_argument("--chf", action="append", required=True)
    c.add_argument("--certificate", action="append", required=True, help="DER or PEM file")
    c.add_argument("--valid-from", required=True, help="YYYY-MM-DD (inclusive)")
    c.add_argument("--valid-to", required=True, help="YYYY-MM-DD (inclusive)")
    c.add_argument("--max-releases", type=int, default=0)
    c.add_argument("--note", default="")


def main(argv: list[str] | None = None) -> int:
    from keysvc.client import KeysvcCallError
    argv = list(sys.argv[1:] if argv is None else argv)
    # `keysvc admin escrow deposit` reads as the issue spells it
    if len(argv) >= 3 and argv[0] == "admin" and argv[1] in ("escrow", "rewrap"):
        argv = ["admin", f"{argv[1]}-{argv[2]}", *argv[3:]]
    args = build_parser().parse_args(argv)  # usage errors exit 2
    _JSON["on"] = bool(getattr(args, "json", False))
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:
        # `pip install keysvc` is the client and this CLI's calls; serving and the ceremonies
        # that talk to the token need the server's dependencies.
        if (exc.name or "").split(".")[0] not in SERVER_MODULES:
            raise
        err.print(f"keysvc: this command needs the server's dependencies ({exc.name} is not "
                  f"installed): pip install 'keysvc[server]'", markup=False, highlight=False)
        return EXIT_USAGE
    except KeysvcCallError as exc:
        if not exc.reason and exc.status in (grpc.StatusCode.UNAVAILABLE,
                                             grpc.StatusCode.DEADLINE_EXCEEDED):
            err.print(f"[red]error[/red]: cannot reach keysvc at "
                      f"{shown(getattr(args, 'server', '?'))}: {exc.status.name}")
            return EXIT_UNREACHABLE
        err.print(Text.assemble(("error", "red"), f": {exc.status.name} {exc.reason}: ",
                                shown(exc.message)))
        return EXIT_REFUSED
    except grpc.RpcError as exc:  # a raw stub's (none of the commands above use one)
        from keysvc.client import error_reason
        reason = error_reason(exc)
        if not reason and exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                         grpc.StatusCode.DEADLINE_EXCEEDED):
            err.print(f"[red]error[/red]: cannot reach keysvc at "
                      f"{shown(getattr(args, 'server', '?'))}: {exc.code().name}")
            return EXIT_UNREACHABLE
        err.print(Text.assemble(("error", "red"), f": {exc.code().name} {reason}: ",
                                shown(exc.details() or "")))
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
