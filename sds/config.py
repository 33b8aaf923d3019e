"""Server configuration: CLI option > environment variable > default, validated once.

Every setting is described once in ``SETTINGS``; the dataclass, the environment
lookup, the click options of every ``sds`` command and the README table all come
from that one list, so a limit cannot exist under two spellings.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_SECRET_LENGTH = 32
VALUE_MODES = ("blob", "snapshot")
SYNC_MODES = ("normal", "full")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
AUTH_REFUSALS = ("http", "close")
MiB = 1024 * 1024


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message is one line for the operator."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything the server and the CLI need to know, already validated."""

    jwt_secret: str = field(repr=False)
    issuer: str | None = None
    host: str = "127.0.0.1"
    port: int = 3000
    persist_dir: Path | None = None
    database_url: str | None = field(default=None, repr=False)
    database_url_file: Path | None = None
    database_pool_size: int = 10
    value_mode: str = "blob"
    sync: str = "normal"
    max_frame_bytes: int = 32 * MiB
    max_store_id_length: int = 128
    max_connections: int = 10_000
    max_connections_per_store: int = 1_000
    max_client_buffer_bytes: int = 16 * MiB
    max_pending_bytes_per_store: int = 64 * MiB
    max_pending_bytes_total: int = 256 * MiB
    max_catchup_bytes_per_client: int = 4 * MiB
    max_catchup_bytes_total: int = 64 * MiB
    max_chunk_bytes_per_client: int = 64 * MiB
    max_chunk_bytes_total: int = 256 * MiB
    max_chunk_bytes_per_store: int = 128 * MiB
    chunk_timeout: float = 60.0
    max_open_stores: int = 256
    store_close_grace: float = 5.0
    max_request_bytes: int = 64 * 1024
    heartbeat: float = 30.0
    shutdown_timeout: float = 10.0
    allowed_origins: tuple[str, ...] = ()
    auth_refusal: str = "http"
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    mint_beyond_admin_expiry: bool = False
    permessage_deflate: bool = False
    lock_dir: Path | None = None
    handover_grace: float = 2.0
    database_ownership: bool = True
    advertise_url: str | None = None
    log_format: str = "text"
    log_level: str = "info"

    def replace(self, **changes: Any) -> Config:
        """A copy with some values changed (validated again)."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self, *, require_secret: bool = True) -> None:
        """Raise ConfigError for values no server should start with."""
        if (require_secret or self.jwt_secret) and len(self.jwt_secret) < MIN_SECRET_LENGTH:
            raise ConfigError(
                f"the JWT secret must be at least {MIN_SECRET_LENGTH} characters "
                f"(it has {len(self.jwt_secret)}); `sds secret generate` makes one"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, not {self.port}")
        for name in ("value_mode", "sync", "log_format", "log_level", "auth_refusal"):
            choices = _CHOICES[name]
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name.replace('_', '-')} must be one of {', '.join(choices)}")
        if self.lock_dir is not None and self.persist_dir is not None:
            raise ConfigError(
                "lock-dir is for relay-only processes; a server with a persist dir "
                "takes its store locks in the persist dir"
            )
        if self.advertise_url is not None and not self.advertise_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError("advertise-url must be an http:// or https:// URL")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be greater than 0")
        self._validate_database()

    def _validate_database(self) -> None:
        """One backend at a time; a database URL must be a PostgreSQL URL."""
        if self.persist_dir is not None and self.database_url is not None:
            raise ConfigError(
                "--persist-dir and --database-url exclude each other: choose one storage backend"
            )
        if self.database_url is not None:
            scheme = self.database_url.partition("://")[0].lower()
            if scheme not in ("postgres", "postgresql"):
                raise ConfigError(
                    f"database-url must start with postgresql://, not {redacted_url(self.database_url)!r}"
                )


_CHOICES = {
    "value_mode": VALUE_MODES,
    "sync": SYNC_MODES,
    "log_format": LOG_FORMATS,
    "log_level": LOG_LEVELS,
    "auth_refusal": AUTH_REFUSALS,
}
_POSITIVE = (
    "max_frame_bytes",
    "max_store_id_length",
    "max_connections",
    "max_connections_per_store",
    "max_client_buffer_bytes",
    "max_pending_bytes_per_store",
    "max_pending_bytes_total",
    "max_catchup_bytes_per_client",
    "max_catchup_bytes_total",
    "max_chunk_bytes_per_client",
    "max_chunk_bytes_total",
    "max_chunk_bytes_per_store",
    "chunk_timeout",
    "max_open_stores",
    "database_pool_size",
    "max_request_bytes",
    "heartbeat",
    "shutdown_timeout",
    "handover_grace",
)


def _parse_int(text: str) -> int:
    try:
        return int(text.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"not a whole number: {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError(f"not a number: {text!r}") from None


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"not a yes/no value: {text!r}")


def _parse_switch(text: str) -> bool:
    """on/off given as a value (``--database-ownership off``), for a setting that is on by default."""
    return _parse_bool(text)


def _parse_origins(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse_networks(text: str) -> tuple[str, ...]:
    """Comma-separated addresses or CIDR networks, in canonical form."""
    networks = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            networks.append(str(ipaddress.ip_network(part.strip(), strict=False)))
        except ValueError:
            raise ConfigError(f"not an IP address or network: {part.strip()!r}") from None
    return tuple(networks)


def _parse_choice(name: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in _CHOICES[name]:
            raise ConfigError(f"must be one of {', '.join(_CHOICES[name])}, not {text!r}")
        return value

    return parse


@dataclass(frozen=True)
class Setting:
    """One configuration value: its field, option, environment variables and parser."""

    name: str
    env: tuple[str, ...]
    parse: Callable[[str], Any]
    help: str
    metavar: str = "N"
    multiple: bool = False
    flag: str | None = None
    """The option's spelling when it is not the field name with dashes."""

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def is_flag(self) -> bool:
        """An on/off option given without a value (``--permessage-deflate``)."""
        return self.parse is _parse_bool


SETTINGS: tuple[Setting, ...] = (
    Setting("issuer", ("SDS_ISSUER",), str, "Required `iss` claim of every token.", "ISS"),
    Setting("host", ("SDS_HOST",), str, "Address to listen on (0.0.0.0 only on purpose).", "HOST"),
    Setting("port", ("SDS_PORT",), _parse_int, "TCP port to listen on."),
    Setting(
        "persist_dir",
        ("SDS_PERSIST_DIR", "SDS_PERSISTENCE_DIR"),
        Path,
        "Directory of the per-store SQLite files; unset = relay only.",
        "DIR",
    ),
    Setting(
        "database_url",
        ("SDS_DATABASE_URL",),
        str,
        "PostgreSQL URL (postgresql://user:password@host:port/db) to keep the stores in "
        "instead of a persist dir; prefer the file variant, a URL on the command line is "
        "visible to every local user.",
        "URL",
    ),
    Setting(
        "database_url_file",
        ("SDS_DATABASE_URL_FILE",),
        Path,
        "File holding the PostgreSQL URL (with its password); read once at start-up.",
        "FILE",
    ),
    Setting(
        "database_pool_size",
        ("SDS_DATABASE_POOL_SIZE",),
        _parse_int,
        "Connections to PostgreSQL at most (commits, catch-up reads and value answers share them).",
    ),
    Setting(
        "value_mode",
        ("SDS_VALUE_MODE",),
        _parse_choice("value_mode"),
        "blob: VALUE frames are stored as blobs; snapshot: a VALUE replaces the "
        "store snapshot and prunes older patches (the Node server's behaviour).",
        "MODE",
    ),
    Setting(
        "sync",
        ("SDS_SYNC",),
        _parse_choice("sync"),
        "normal: survives a killed process; full: also survives power loss (slower).",
        "MODE",
    ),
    Setting(
        "max_frame_bytes",
        ("SDS_MAX_FRAME_BYTES",),
        _parse_int,
        "Largest frame accepted, in bytes; a larger one closes the sender with 1009 "
        "and is not relayed.",
    ),
    Setting(
        "max_store_id_length",
        ("SDS_MAX_STORE_ID_LENGTH",),
        _parse_int,
        "Longest store id in characters; longer ids get HTTP 400.",
    ),
    Setting(
        "max_connections",
        ("SDS_MAX_CONNECTIONS",),
        _parse_int,
        "Open /ws and /signal connections together; more get HTTP 503 before the upgrade.",
    ),
    Setting(
        "max_connections_per_store",
        ("SDS_MAX_CONNECTIONS_PER_STORE",),
        _parse_int,
        "Open connections to one store (or signalling room); more get HTTP 503 before the upgrade.",
    ),
    Setting(
        "max_client_buffer_bytes",
        ("SDS_MAX_CLIENT_BUFFER_BYTES",),
        _parse_int,
        "Outgoing bytes queued for one client, beyond one largest frame (the "
        "effective bound is this plus max-frame-bytes); a client that falls further "
        "behind is closed with 1013.",
    ),
    Setting(
        "max_pending_bytes_per_store",
        ("SDS_MAX_PENDING_BYTES_PER_STORE",),
        _parse_int,
        "Bytes of one store's frames waiting for their commit; past it the store's "
        "writers are not read until commits catch up (persistence on).",
    ),
    Setting(
        "max_pending_bytes_total",
        ("SDS_MAX_PENDING_BYTES_TOTAL",),
        _parse_int,
        "Bytes waiting for their commit in all stores together; past it no writer is "
        "read until commits catch up (persistence on).",
    ),
    Setting(
        "max_catchup_bytes_per_client",
        ("SDS_MAX_CATCHUP_BYTES_PER_CLIENT",),
        _parse_int,
        "Bytes of one catch-up page read from storage for a joiner (at least one "
        "stored frame); the next page is read once the socket took this one.",
    ),
    Setting(
        "max_catchup_bytes_total",
        ("SDS_MAX_CATCHUP_BYTES_TOTAL",),
        _parse_int,
        "Bytes of catch-up pages held for all joiners together; a joiner past it "
        "waits its turn (closed with 1013 after 60 s without room).",
    ),
    Setting(
        "max_chunk_bytes_per_client",
        ("SDS_MAX_CHUNK_BYTES_PER_CLIENT",),
        _parse_int,
        "Bytes for reassembling one client's VALUE_CHUNK sequences; a sequence that "
        "does not fit is relayed, not stored, and its sender is closed with 1013.",
    ),
    Setting(
        "max_chunk_bytes_total",
        ("SDS_MAX_CHUNK_BYTES_TOTAL",),
        _parse_int,
        "Bytes for reassembling VALUE_CHUNK sequences, all clients together; a "
        "sequence that does not fit is relayed, not stored, and its sender is closed "
        "with 1013.",
    ),
    Setting(
        "max_chunk_bytes_per_store",
        ("SDS_MAX_CHUNK_BYTES_PER_STORE",),
        _parse_int,
        "Bytes for reassembling VALUE_CHUNK sequences, all clients of one store "
        "together; a sequence that does not fit is relayed, not stored, and its "
        "sender is closed with 1013.",
    ),
    Setting(
        "chunk_timeout",
        ("SDS_CHUNK_TIMEOUT",),
        _parse_float,
        "Seconds an incomplete VALUE_CHUNK sequence may wait for its next chunk.",
        "SECONDS",
    ),
    Setting(
        "max_open_stores",
        ("SDS_MAX_OPEN_STORES",),
        _parse_int,
        "Store files open at once; a new store beyond it gets HTTP 503.",
    ),
    Setting(
        "store_close_grace",
        ("SDS_STORE_CLOSE_GRACE",),
        _parse_float,
        "Seconds a store file stays open after its last client left.",
        "SECONDS",
    ),
    Setting(
        "max_request_bytes",
        ("SDS_MAX_REQUEST_BYTES",),
        _parse_int,
        "Largest HTTP request body in bytes (token API); larger gets HTTP 413.",
    ),
    Setting(
        "heartbeat",
        ("SDS_HEARTBEAT",),
        _parse_float,
        "Seconds between keepalive pings; a peer that misses the pong is closed.",
        "SECONDS",
    ),
    Setting(
        "shutdown_timeout",
        ("SDS_SHUTDOWN_TIMEOUT",),
        _parse_float,
        "Seconds a SIGTERM/SIGINT stop may take: clients get half of it to close, "
        "then are cut off; storage is flushed before the process exits.",
        "SECONDS",
    ),
    Setting(
        "allowed_origins",
        ("SDS_ALLOWED_ORIGINS",),
        _parse_origins,
        "Browser Origin allowed to connect (repeatable; env: comma-separated); others "
        "get HTTP 403, requests without Origin are accepted. Default: any.",
        "ORIGIN",
        multiple=True,
        flag="--allowed-origin",
    ),
    Setting(
        "auth_refusal",
        ("SDS_AUTH_REFUSAL",),
        _parse_choice("auth_refusal"),
        "How a refused token on /ws and /signal is answered. http: HTTP 401/403 before "
        "the upgrade; close: upgrade, then close at once with 4001 (token) or 4003 "
        "(another store), for the SDS sidecar, which reads only close codes.",
        "MODE",
    ),
    Setting(
        "trusted_proxies",
        ("SDS_TRUSTED_PROXIES",),
        _parse_networks,
        "Reverse proxy address or CIDR network whose X-Forwarded-For / Forwarded "
        "header names the client (repeatable; env: comma-separated). Default: "
        "loopback (127.0.0.0/8, ::1).",
        "CIDR",
        multiple=True,
        flag="--trusted-proxy",
    ),
    Setting(
        "mint_beyond_admin_expiry",
        ("SDS_MINT_BEYOND_ADMIN_EXPIRY",),
        _parse_bool,
        "Let POST /api/token mint tokens that expire after the admin token that "
        "asks for them (off: their `exp` is capped at the admin token's).",
        "BOOL",
    ),
    Setting(
        "permessage_deflate",
        ("SDS_PERMESSAGE_DEFLATE",),
        _parse_bool,
        "Accept permessage-deflate from clients (off: it costs CPU on every frame).",
        "BOOL",
    ),
    Setting(
        "lock_dir",
        ("SDS_LOCK_DIR",),
        Path,
        "Without a persist dir (relay only, or stores in PostgreSQL on one machine): "
        "directory where the processes of one machine take a lock per store (and per "
        "signalling room); the holder owns it and the others forward its clients there. "
        "A server with a persist dir uses its persist dir.",
        "DIR",
    ),
    Setting(
        "handover_grace",
        ("SDS_HANDOVER_GRACE",),
        _parse_float,
        "Seconds a store whose clients all arrive forwarded by other processes stays here "
        "before it is handed over (clients closed with 1012, reconnect through the proxy).",
        "SECONDS",
    ),
    Setting(
        "database_ownership",
        ("SDS_DATABASE_OWNERSHIP",),
        _parse_switch,
        "With --database-url and no --lock-dir: the servers of one database own its "
        "stores through it (a lease row and an advisory lock per store, every commit "
        "fenced by the lease's epoch), so a store is never split between servers on "
        "several machines. off: a single server per database (one round trip less "
        "per commit).",
        "SWITCH",
    ),
    Setting(
        "advertise_url",
        ("SDS_ADVERTISE_URL",),
        str,
        "The http:// URL other sds processes reach this one at, recorded with the "
        "stores it owns (forwarded connections go there). Default: the address it "
        "binds (0.0.0.0 reads as 127.0.0.1: set this for servers on several machines).",
        "URL",
    ),
    Setting(
        "log_format", ("SDS_LOG_FORMAT",), _parse_choice("log_format"), "text or json.", "FORMAT"
    ),
    Setting(
        "log_level",
        ("SDS_LOG_LEVEL",),
        _parse_choice("log_level"),
        "debug, info, warning or error.",
        "LEVEL",
    ),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}
SECRET_ENV = "SDS_JWT_SECRET"
SECRET_FILE_ENV = "SDS_JWT_SECRET_FILE"


def read_secret_file(path: Path) -> str:
    """The secret held in a file, without surrounding white space."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the JWT secret file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the JWT secret file {path} is not UTF-8 text") from None


def resolve_secret(secret_file: Path | None, environ: Mapping[str, str]) -> str:
    """The JWT secret: --jwt-secret-file, then SDS_JWT_SECRET_FILE, then SDS_JWT_SECRET."""
    if secret_file is not None:
        return read_secret_file(secret_file)
    if environ.get(SECRET_FILE_ENV):
        return read_secret_file(Path(environ[SECRET_FILE_ENV]))
    if environ.get(SECRET_ENV):
        return environ[SECRET_ENV].strip()
    raise ConfigError(
        f"no JWT secret: set {SECRET_ENV}, {SECRET_FILE_ENV} or --jwt-secret-file "
        "(`sds secret generate` makes one)"
    )


def load_config(
    options: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    secret: str | None = None,
    secret_file: Path | None = None,
    require_secret: bool = True,
) -> Config:
    """Build a validated Config from CLI options (None = not given), the environment and defaults.

    ``options`` maps setting names to values that are either already typed or strings
    (click passes strings so that every value is parsed and reported the same way).
    """
    options = options or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = options.get(setting.name)
        source = setting.option
        if raw is None or (setting.multiple and raw == ()):
            raw, source = _from_environ(setting, environ)
        if raw is None:
            continue
        values[setting.name] = _parse_value(setting, raw, source)
    if secret is None:
        try:
            secret = resolve_secret(secret_file, environ)
        except ConfigError:
            if require_secret or secret_file is not None:
                raise
            secret = ""
    if values.get("database_url_file") is not None:
        if values.get("database_url") is not None:
            raise ConfigError("give --database-url or --database-url-file, not both")
        values["database_url"] = read_database_url_file(values["database_url_file"])
    config = Config(jwt_secret=secret, **values)
    config.validate(require_secret=require_secret)
    return config


def read_database_url_file(path: Path) -> str:
    """The database URL held in a file, without surrounding white space."""
    try:
        url = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the database URL file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the database URL file {path} is not UTF-8 text") from None
    if not url:
        raise ConfigError(f"the database URL file {path} is empty")
    return url


def redacted_url(url: str) -> str:
    """A database URL fit for logs and errors: the password (also a ``password=`` query) masked."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable database URL>"
    netloc = parts.netloc
    userinfo, at, hostinfo = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
    query = "&".join(
        f"{name}=***" if name.lower() == "password" else f"{name}={value}" if value else name
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _from_environ(setting: Setting, environ: Mapping[str, str]) -> tuple[str | None, str]:
    for name in setting.env:
        if environ.get(name, "") != "":
            return environ[name], name
    return None, ""


def _parse_value(setting: Setting, raw: Any, source: str) -> Any:
    """Parse a string (or, for a repeatable option, each string); typed values pass as they are."""
    try:
        if setting.multiple and isinstance(raw, tuple | list):
            return tuple(item for text in raw for item in setting.parse(text))
        if isinstance(raw, str):
            return setting.parse(raw)
        return raw
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def check_persist_dir(path: Path) -> None:
    """Create the persist dir if needed and make sure this process can write into it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"persist dir {path} cannot be created: {exc.strerror}") from None
    if not path.is_dir():
        raise ConfigError(f"persist dir {path} is not a directory")
    probe = path / f".sds-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"persist dir {path} is not writable: {exc.strerror}") from None
