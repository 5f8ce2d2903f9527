"""Settings: built-in development defaults, then a TOML file, then KEYSVC_* variables.

Every setting has one name, used as the TOML key and, upper-cased with a KEYSVC_ prefix,
as the environment variable (`database_url` <-> KEYSVC_DATABASE_URL). PINs are read from a
file or variable at start and never logged (the dataclass hides them from repr).
"""
from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PARTITIONS = ("s1sp", "dco", "admin")
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass(frozen=True)
class Settings:
    state_dir: Path = Path(".keysvc")
    # The partitions this process serves (`serve --partitions`): it logs in to those tokens
    # only, reads only their PINs and serves only their services. "admin" is always among
    # them: every call is audited with the admin token's MAC key (README, split deployment).
    partitions: str = "s1sp,dco,admin"
    listen: str = "127.0.0.1:50051"
    dev: bool = True
    pkcs11_module: str = SOFTHSM_MODULE
    s1sp_token_label: str = "keysvc-s1sp"
    dco_token_label: str = "keysvc-dco"
    admin_token_label: str = "keysvc-admin"
    s1sp_pin: str = field(default="", repr=False)
    dco_pin: str = field(default="", repr=False)
    admin_pin: str = field(default="", repr=False)
    s1sp_pin_file: str = ""
    dco_pin_file: str = ""
    admin_pin_file: str = ""
    # The security officer's PINs, needed only by the backup ceremony (`keysvc admin
    # backup`): only the SO may mark the backup key CKA_TRUSTED. The server never reads them.
    s1sp_so_pin_file: str = ""
    dco_so_pin_file: str = ""
    admin_so_pin_file: str = ""
    database_url: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    trust_anchors_dir: str = ""
    # The first security officers: comma-separated certificate files, read once, when the
    # admin token has no roster yet (development: the two generated officers). After that
    # officers are enrolled and removed under dual control.
    initial_officers: str = ""
    # CRLs of the client CA (PEM or DER files), read at start, on SIGHUP and this often.
    client_crl_dir: str = ""
    client_crl_refresh_seconds: float = 300.0
    # How old the roster (officers, deny list) read from the admin token may be on another
    # replica; a change made on this one counts at once.
    roster_refresh_seconds: float = 1.0
    max_file_bytes: int = 64 * 1024 * 1024
    # The rewrap job (keysvc/custody/rewrap.py): at most this many stored keys a second are
    # moved to the primary storage-key version, in batches of `rewrap_batch`; 0 stops it.
    rewrap_rows_per_second: float = 3300.0
    rewrap_batch: int = 250
    max_xml_depth: int = 64
    quorum: int = 2
    hsm_pool_size: int = 8
    hsm_acquire_timeout: float = 15.0
    import_job_ttl_hours: int = 24
    # Import jobs one officer may have outstanding (each is an RSA-3072 pair in the token).
    import_job_quota: int = 10
    # The audit chain's head is copied into the admin token at most this often (and on the
    # first event): events cut from the end of the log before the last copy are found.
    audit_checkpoint_seconds: float = 5.0   # unused since issue 14 (an anchor per batch)
    # How long a call waits for its audit event to be chained and in every sink before it
    # fails closed (UNAVAILABLE AUDIT_UNAVAILABLE).
    audit_timeout_seconds: float = 5.0
    # Group commit: while other calls of the process are at their work, a batch of audit
    # events waits up to this long for theirs (keysvc/audit/writer.py). 0: never waits.
    audit_commit_delay_ms: float = 20.0
    # The JSON-lines sink: audit-<database instance>.jsonl in this directory, rotated at
    # audit_file_max_bytes, audit_file_keep files kept.
    audit_dir: str = ""
    audit_file_max_bytes: int = 64 * 1024 * 1024
    audit_file_keep: int = 10
    # Syslog over TLS (RFC 5424/5425), host:port; the CA that signs the collector's
    # certificate, and a client certificate if the collector asks for one.
    audit_syslog: str = ""
    audit_syslog_ca: str = ""
    audit_syslog_cert: str = ""
    audit_syslog_key: str = ""
    metrics_listen: str = ""
    # Server processes behind `listen` (SO_REUSEPORT; keysvc/processes.py): one per core to
    # use every core. Worker i > 0 serves its metrics and probes on metrics_listen's port + i.
    processes: int = 1
    # Threads for the calls' work, each process (migration files have threads of their own).
    # Few: one thread runs Python at a time and the HSM takes one call at a time, so more
    # threads only hand the GIL and the HSM's lock to each other (bench/bench_cores.py:
    # 16 threads made 49 context switches a call and 332 calls/s, 4 made 36 and 405).
    workers: int = 4
    # Worker processes that check DeviceCertificates while the HSM wraps keys (0: inline).
    certificate_workers: int = 1
    log_level: str = "INFO"
    # OpenTelemetry traces (keysvc/tracing.py), off when empty: an OTLP/gRPC collector,
    # "https://host:4317" (verified against otlp_ca, else the system's CAs) or
    # "http://host:4317" (plain: spans carry no secret, but say where time went).
    otlp_endpoint: str = ""
    otlp_ca: str = ""
    # mlockall at start, so that key buffers never reach swap (keysvc/hardening.py): "auto"
    # locks when the host has swap (without swap there is nothing to lock against, and
    # locking costs about 10% of small-call throughput), "true" always, "false" never.
    lock_memory: str = "auto"

    # ------------------------------------------------------------------ derived
    def path(self, *parts: str) -> Path:
        return self.state_dir.joinpath(*parts)

    @property
    def served(self) -> tuple[str, ...]:
        """The partitions this process serves, in PARTITIONS order."""
        named = {p.strip() for p in self.partitions.split(",") if p.strip()}
        return tuple(p for p in PARTITIONS if p in named)

    def token_label(self, partition: str) -> str:
        return getattr(self, f"{partition}_token_label")

    def pin(self, partition: str) -> str:
        """The PIN from the setting, else its file, else the dev state's pin file."""
        value = getattr(self, f"{partition}_pin")
        if value:
            return value
        pin_file = getattr(self, f"{partition}_pin_file") or (
            str(self.path("hsm", "pins", f"{partition}.pin")) if self.dev else "")
        if not pin_file:
            raise ValueError(f"no PIN configured for the {partition} token "
                             f"(set KEYSVC_{partition.upper()}_PIN_FILE)")
        return Path(pin_file).read_text().strip()

    def so_pin(self, partition: str) -> str:
        """The security officer's PIN from its file (development: the dev state's)."""
        pin_file = getattr(self, f"{partition}_so_pin_file") or (
            str(self.path("hsm", "pins", f"{partition}.so-pin")) if self.dev else "")
        if not pin_file or not Path(pin_file).exists():
            raise ValueError(f"no security officer PIN for the {partition} token "
                             f"(set {partition}_so_pin_file)")
        return Path(pin_file).read_text().strip()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.path('keysvc.db').resolve()}"

    @property
    def tls_files(self) -> tuple[Path, Path, Path]:
        pki = self.path("pki")
        return (Path(self.tls_cert or pki / "server.pem"),
                Path(self.tls_key or pki / "server.key"),
                Path(self.tls_client_ca or pki / "ca.pem"))

    @property
    def audit_files(self) -> Path:
        return Path(self.audit_dir or self.path("audit"))

    @property
    def client_crls(self) -> Path:
        return Path(self.client_crl_dir or self.path("client-crls"))

    @property
    def trust_anchors(self) -> Path:
        return Path(self.trust_anchors_dir or self.path("trust-anchors"))


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that might resolve anywhere
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


_DEFAULTS = Settings()


def problems(s: Settings) -> list[str]:
    """Everything wrong with these settings, in words an operator can act on; [] if none.
    Checked at start (the server refuses to start) and by `keysvc config check`."""
    out: list[str] = []

    def at_least(name: str, low: float) -> None:
        if getattr(s, name) < low:
            out.append(f"{name} must be at least {low:g} (it is {getattr(s, name)!r})")
    if not 0 <= s.audit_commit_delay_ms <= s.audit_timeout_seconds * 100:
        out.append("audit_commit_delay_ms must be from 0 to a tenth of audit_timeout_seconds "
                   f"(it is {s.audit_commit_delay_ms!r})")
    if s.quorum < 2:
        out.append(f"quorum must be at least 2: dual control (it is {s.quorum})")
    for name, low in (("processes", 1), ("workers", 1), ("hsm_pool_size", 1),
                      ("hsm_acquire_timeout", 0.1),
                      ("import_job_ttl_hours", 1), ("import_job_quota", 1),
                      ("audit_timeout_seconds", 0.1), ("audit_file_max_bytes", 4096),
                      ("audit_file_keep", 1), ("max_file_bytes", 1024), ("max_xml_depth", 8),
                      ("roster_refresh_seconds", 0), ("client_crl_refresh_seconds", 1),
                      ("certificate_workers", 0)):
        at_least(name, low)
    named = [p.strip() for p in s.partitions.split(",") if p.strip()]
    if not named or set(named) - set(PARTITIONS) or len(named) != len(set(named)):
        out.append(f"partitions must name some of {', '.join(PARTITIONS)}, each once")
    elif "admin" not in named:
        out.append("partitions must include admin: every call is audited with the admin "
                   "token's MAC key (s1sp,admin or dco,admin for one organisation)")
    for partition in set(PARTITIONS) - set(s.served):
        for name in (f"{partition}_pin", f"{partition}_pin_file"):
            if getattr(s, name):
                out.append(f"{name} is given to a process that does not serve {partition}: "
                           f"remove it (a process holds its own partitions' PINs only)")
    if s.lock_memory.lower() not in ("auto", "true", "false"):
        out.append("lock_memory must be auto, true or false")
    if s.otlp_endpoint and not (s.otlp_endpoint.startswith("https://") or (
            s.otlp_endpoint.startswith("http://")
            and _loopback(s.otlp_endpoint.split("://", 1)[1].split("/", 1)[0]))):
        # (not echoed: an endpoint may carry credentials)
        out.append("otlp_endpoint must be https://HOST:PORT, or http:// to a loopback "
                   "address only (spans say who called what, when)")
    if s.log_level.upper() not in _LOG_LEVELS:
        out.append(f"log_level must be one of {', '.join(_LOG_LEVELS)}")
    if ":" not in s.listen or not s.listen.rsplit(":", 1)[1].isdigit():
        out.append(f"listen must be HOST:PORT (it is {s.listen!r})")
    elif s.processes > 1 and s.listen.rsplit(":", 1)[1] == "0":
        out.append("several processes share one port: listen needs a port, not 0")
    if s.dev:
        given = [n for n in IDENTITY_SETTINGS if getattr(s, n) != getattr(_DEFAULTS, n)]
        if given:
            out.append(f"the development set-up makes its own {', '.join(given)}: give them "
                       f"in a configuration file without dev, or drop them")
    for name in ("listen", "metrics_listen"):
        value = getattr(s, name)
        if s.dev and value and not _loopback(value):
            out.append(f"the development set-up (no configuration) listens on a loopback "
                       f"address only; give a configuration file for {name} {value!r}")
    if not s.dev:
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            if not getattr(s, name):
                out.append(f"{name} is required outside the development set-up "
                           f"(or pass --dev)")
        for partition in s.served:
            if not (getattr(s, f"{partition}_pin") or getattr(s, f"{partition}_pin_file")):
                out.append(f"no PIN for the {partition} token: set {partition}_pin_file "
                           f"(or KEYSVC_{partition.upper()}_PIN)")
    files = [getattr(s, n) for n in ("tls_cert", "tls_key", "tls_client_ca", "audit_syslog_ca",
                                     "otlp_ca")]
    files += [getattr(s, f"{p}_pin_file") for p in s.served]  # another's PIN is not read
    files += [f.strip() for f in s.initial_officers.split(",") if f.strip()]
    for f in files:
        if f and not os.access(f, os.R_OK):
            out.append(f"{f} cannot be read")
    if not Path(s.pkcs11_module).exists():
        out.append(f"pkcs11_module {s.pkcs11_module} does not exist")
    return out


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

# Who the server is and how it reaches its keys: settings the development set-up makes for
# itself (a local CA that mints officer certificates, SoftHSM2 tokens, PINs in files), so it
# never runs with any of them given, nor with a configuration file.
IDENTITY_SETTINGS = ("pkcs11_module", "tls_cert", "tls_key", "tls_client_ca",
                     "s1sp_pin", "dco_pin", "admin_pin", "s1sp_pin_file", "dco_pin_file",
                     "admin_pin_file", "s1sp_so_pin_file", "dco_so_pin_file",
                     "admin_so_pin_file", "s1sp_token_label", "dco_token_label",
                     "admin_token_label", "initial_officers")
# Settings that neither name an identity nor say where state or events go: given from
# KEYSVC_* variables they leave "no configuration" (api.md's development default) as it is.
# Any other setting (database_url, audit_dir, audit_syslog, trust_anchors_dir, ...) is a
# configuration, and the development set-up then runs only when asked for (--dev,
# KEYSVC_DEV): development against PostgreSQL or a syslog collector, say.
TUNING_SETTINGS = ("state_dir", "partitions", "listen", "processes", "workers", "log_level",
                   "lock_memory", "metrics_listen", "rewrap_rows_per_second", "rewrap_batch",
                   "audit_timeout_seconds", "audit_commit_delay_ms", "audit_file_max_bytes",
                   "audit_file_keep", "max_file_bytes", "max_xml_depth", "hsm_pool_size",
                   "hsm_acquire_timeout", "import_job_ttl_hours", "import_job_quota",
                   "certificate_workers", "roster_refresh_seconds", "client_crl_refresh_seconds",
                   "audit_checkpoint_seconds", "dev")


def _coerce(kind: type | str, raw: Any) -> object:
    kind = str(kind)
    if "Path" in kind:
        return Path(str(raw))
    if "bool" in kind:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word not in _TRUE + _FALSE:
            raise ValueError(word)
        return word in _TRUE
    if "int" in kind:
        return int(raw)
    if "float" in kind:
        return float(raw)
    return str(raw)


def load(config_file: str | None = None, env: Mapping[str, str] | None = None,
         **overrides: object) -> Settings:
    """api.md: with no configuration `keysvc serve` is the development set-up. A
    configuration is a file (--config, KEYSVC_CONFIG) or any setting outside
    TUNING_SETTINGS; it turns the development set-up off unless `dev` is asked for, and a
    file or an IDENTITY_SETTINGS value refuses `dev` (see `problems`)."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    if config_file is None and "KEYSVC_CONFIG" in env:
        config_file = env["KEYSVC_CONFIG"]
        if not config_file.strip():  # an unexpanded ${CONFIG}: never "no configuration"
            raise ValueError("KEYSVC_CONFIG is set but empty")
    if config_file:
        with open(config_file, "rb") as toml:
            values.update(tomllib.load(toml))
    for f in fields(Settings):
        key = "KEYSVC_" + f.name.upper()
        if key in env:
            values[f.name] = env[key]
    values.update({k: v for k, v in overrides.items() if v is not None})
    if config_file and str(values.get("dev", False)).strip().lower() in _TRUE:
        raise ValueError("the development set-up (dev, --dev, KEYSVC_DEV) cannot run with a "
                         "configuration file")
    if config_file or any(name not in TUNING_SETTINGS for name in values):
        values.setdefault("dev", False)
    known = {f.name: f.type for f in fields(Settings)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    coerced: dict[str, Any] = {}
    for k, v in values.items():
        try:
            coerced[k] = _coerce(known[k], v)
        except (TypeError, ValueError):
            # The value is not echoed: a setting may hold a secret (a PIN) typed wrongly.
            raise ValueError(f"setting {k} is not a "
                             f"{str(known[k]).split('|')[0].strip()}") from None
    return replace(Settings(), **coerced)
