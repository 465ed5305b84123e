"""Configuration: config.toml read once into frozen, slotted dataclasses.

Unknown keys and bad values fail at start with their TOML path in the message
(`ConfigError("limits.rpm: expected an integer >= 0, got 'x'")`), so a typo never
silently turns a limit off. Secrets are never in the file: a channel names the
environment variable that holds its credential. Each component receives only its
own section.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from relay.headers import DEFAULT_ANTHROPIC_BETAS


class ConfigError(ValueError):
    """A configuration value is missing, unknown or malformed (message names its path)."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1  # "auto" is resolved to os.cpu_count() when read
    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0  # a client must finish its request head within this
    keepalive_timeout_s: float = 75.0
    drain_grace_s: float = 30.0  # SIGTERM: in-flight streams get this long to finish
    access_log: bool = False
    trust_client_request_id: bool = True
    log_client_ip: bool = False
    # Reverse proxies (addresses or CIDR blocks) whose X-Forwarded-For names the client;
    # from any other peer the header is ignored. Empty: the TCP peer is the client.
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    dsn: str = ""  # empty: embedded Postgres in data_dir
    data_dir: str = ".tollway"
    pool_min: int = 1
    pool_max: int = 8


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float = 60.0
    first_byte_timeout_reasoning_s: float = 180.0
    idle_timeout_s: float = 60.0  # longest gap between two stream chunks
    total_timeout_s: float = 900.0
    max_attempts: int = 3  # channels tried before the first byte
    retry_deadline_s: float = 30.0
    # Inside one priority, channels speaking the client's protocol are tried before those
    # that need translation; false: one priority's channels are mixed by weight alone.
    prefer_native: bool = True
    pool_size: int = 256  # keep-alive connections per upstream host
    reasoning_models: tuple[str, ...] = ("o1*", "o3*", "o4*", "gpt-5*", "*thinking*", "*reasoner*")
    breaker_window_s: float = 60.0  # error rate is measured over this sliding window
    breaker_min_requests: int = 5  # no verdict on fewer attempts than this
    breaker_error_rate: float = 0.5  # open at or above this share of failed attempts
    breaker_cooldown_s: float = 10.0  # then one half-open probe
    health_check_interval_s: float = 0.0  # active probes of open channels; 0: off
    health_check_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    flush_interval_ms: int = 250
    flush_rows: int = 5000
    max_pending_rows: int = 200_000  # beyond this, settled rows wait in the journal only
    journal_dir: str = ""  # empty: <data_dir>/journal
    journal_fsync_ms: int = 50
    # A catch-up batch (more than flush_rows waiting) is split over this many connections,
    # each part its own transaction, so the inserts run on several Postgres backends.
    flush_connections: int = 2
    retention_days: int = 90
    charge_zero_output_aborts: bool = False
    # One ledger process per host flushes every worker's journal (accounting.ledgerd);
    # false: each worker flushes its own, in its own event loop.
    process: bool = False


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    redis_url: str = ""
    key_concurrency: int = 100
    user_concurrency: int = 0  # 0: unlimited
    key_rpm: int = 0
    key_tpm: int = 0
    user_rpm: int = 0
    user_tpm: int = 0
    lease_block: int = 10  # units a worker leases from Redis at a time
    default_max_output_tokens: int = 4096  # reservation size when a request names none
    user_max_ips: int = 0  # distinct client IPs per user in the window; 0: unlimited
    user_ip_window_s: int = 300
    auth_failures_per_minute: int = 30  # per client IP, then 429


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    port: int = 0  # 0: served on the main port at /metrics
    token: str = ""  # when set, /metrics requires "Authorization: Bearer <token>"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    token_env: str = "TOLLWAY_ADMIN_TOKEN"
    token: str = ""  # for demos; prefer token_env
    min_topup: str = "0.01"  # USD; smaller top-ups through the admin API are refused


@dataclass(frozen=True, slots=True)
class GrowthConfig:
    signup_credit: str = "0"  # USD credited to a user created through sign-up
    invite_credit: str = "0"  # USD credited to a user who signs up with an invite code
    invite_share: str = "0"  # fraction of the invitee's first top-up paid to the inviter


@dataclass(frozen=True, slots=True)
class AccountsConfig:
    """The console's accounts and sessions (relay/console)."""

    signup: str = "open"  # open | invite (a code is required) | closed
    verify_email: bool = True  # sign-up credits wait for the emailed code
    max_devices: int = 2  # console sessions per user; a new login signs out the oldest
    session_idle_s: int = 7 * 86400  # a session unused this long ends
    session_max_s: int = 30 * 86400  # and every session ends this long after login
    public_url: str = ""  # e.g. "https://relay.example.com"; empty: from the request's Host
    cookie_secure: str = "auto"  # auto (Secure + __Host- behind HTTPS) | always | never
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")  # whose X-Forwarded-* are believed
    purchase_url: str = ""  # where the site sells codes or takes payments (shown on Wallet)
    site_name: str = "Tollway"
    min_transfer: str = "0.01"  # USD
    # Throttles: attempts per address and per account within the window, then 429.
    attempts_per_ip: int = 20
    attempts_per_account: int = 10
    attempts_window_s: int = 600
    # argon2id parameters; raising them rehashes each password at its next login.
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    argon2_threads: int = 2  # concurrent hashes per worker
    smtp_host: str = ""  # empty: codes are written to the server log (development)
    smtp_port: int = 587
    smtp_user: str = ""
    smtp_password_env: str = "TOLLWAY_SMTP_PASSWORD"
    smtp_from: str = ""
    smtp_tls: str = "starttls"  # starttls | tls | none
    low_balance_check_s: float = 60.0  # how often worker 0 looks for low-balance alerts; 0: never


def _accounts(a: AccountsConfig) -> AccountsConfig:
    if a.signup not in ("open", "invite", "closed"):
        raise ConfigError(f"accounts.signup: expected \"open\", \"invite\" or \"closed\", got {a.signup!r}")
    if a.cookie_secure not in ("auto", "always", "never"):
        raise ConfigError(f"accounts.cookie_secure: expected auto, always or never, got {a.cookie_secure!r}")
    if a.smtp_tls not in ("starttls", "tls", "none"):
        raise ConfigError(f"accounts.smtp_tls: expected starttls, tls or none, got {a.smtp_tls!r}")
    if a.max_devices < 1:
        raise ConfigError(f"accounts.max_devices: expected an integer >= 1, got {a.max_devices!r}")
    if a.argon2_memory_kib < 8 or a.argon2_time_cost < 1 or a.argon2_threads < 1:
        raise ConfigError("accounts.argon2_*: time_cost and threads >= 1, memory_kib >= 8")
    if a.public_url and not a.public_url.startswith(("http://", "https://")):
        raise ConfigError(f"accounts.public_url: expected an http(s) URL, got {a.public_url!r}")
    _check_decimal("accounts.min_transfer", a.min_transfer)
    return a


@dataclass(frozen=True, slots=True)
class DemoConfig:
    mock_upstream: bool = False  # start bench/mock_upstream beside the gateway
    mock_port: int = 8090
    create_demo_user: bool = True
    demo_balance: str = "5"


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    name: str
    protocol: str  # "openai" | "anthropic"
    base_url: str
    api_key_env: str = ""
    models: tuple[str, ...] = ("*",)
    model_map: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    priority: int = 0
    weight: int = 1
    max_concurrency: int = 0
    responses_api: bool = True  # false: an OpenAI-compatible channel that only has chat completions
    # Client headers beyond the allowlist (relay.headers) that may reach this upstream.
    forward_headers: tuple[str, ...] = ()
    # anthropic-beta flags a client may pass (others are dropped); see relay.headers.
    anthropic_beta: tuple[str, ...] = DEFAULT_ANTHROPIC_BETAS

    @property
    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens, as decimal strings; accounting turns them into exact integers."""

    input: str
    output: str
    cache_read: str = ""
    cache_write: str = ""
    # The output bound written into a request that names none (0: the limits default).
    max_output_tokens: int = 0
    # The long-context tier (accounting.pricing): input tokens (input + cache read +
    # cache write) above which the whole request is billed at the long_context_* prices;
    # 0: no tier. Empty long-context cache prices default to long_context_input.
    long_context_threshold: int = 0
    long_context_input: str = ""
    long_context_output: str = ""
    long_context_cache_read: str = ""
    long_context_cache_write: str = ""


@dataclass(frozen=True, slots=True)
class GroupConfig:
    name: str
    multiplier: str = "1"  # exact decimal or fraction string, e.g. "0.8" or "2/3"
    models: tuple[str, ...] = ("*",)
    # Lower a request's output bound to what the key can afford instead of answering 402.
    fit_output: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    accounts: AccountsConfig = field(default_factory=AccountsConfig)
    channels: tuple[ChannelConfig, ...] = ()
    prices: tuple[tuple[str, Price], ...] = ()  # model (or "default") -> price
    groups: tuple[GroupConfig, ...] = ()
    fallbacks: tuple[tuple[str, tuple[str, ...]], ...] = ()
    path: str = ""

    @property
    def data_dir(self) -> Path:
        base = Path(self.path).parent if self.path else Path.cwd()
        return (base / self.database.data_dir).resolve()

    def admin_token(self) -> str:
        # Stripped: a token written with `echo` into an env file ends in a newline, which
        # no client sends back (the admin API would refuse every request, silently).
        return (os.environ.get(self.admin.token_env, "") or self.admin.token).strip()


# --- parsing -----------------------------------------------------------------------


def _coerce(path: str, expected: Any, value: Any) -> Any:
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{path}: expected an integer >= 0, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{path}: expected a number >= 0, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if expected == "tuple[str, ...]":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: expected a list of strings, got {value!r}")
        return tuple(value)
    if expected == "tuple[tuple[str, str], ...]":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{path}: expected a table of strings, got {value!r}")
        return tuple(value.items())
    raise ConfigError(f"{path}: unsupported value {value!r}")


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _section(cls: Any, path: str, raw: Any, **fixed: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a table, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown setting (known: {', '.join(known)})")
    kwargs: dict[str, Any] = dict(fixed)
    for name, value in raw.items():
        type_name = str(known[name].type)
        kwargs[name] = _coerce(f"{path}.{name}", _TYPES.get(type_name, type_name), value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        missing = [n for n, f in known.items() if n not in kwargs and f.default is f.default_factory]
        raise ConfigError(f"{path}: missing {', '.join(missing) or exc}") from None


def _positive_workers(raw: dict[str, Any]) -> dict[str, Any]:
    raw = dict(raw)
    workers = raw.get("workers", 1)
    if workers == "auto":
        raw["workers"] = os.cpu_count() or 1
    elif isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"server.workers: expected \"auto\" or an integer >= 1, got {workers!r}")
    return raw


def _check_decimal(path: str, value: str) -> None:
    from decimal import Decimal, InvalidOperation

    try:
        d = Decimal(value)
    except InvalidOperation:
        raise ConfigError(f"{path}: expected a decimal string such as \"0.15\", got {value!r}")
    if not d.is_finite() or d < 0:
        raise ConfigError(f"{path}: expected a non-negative decimal, got {value!r}")


def _growth(g: GrowthConfig) -> GrowthConfig:
    _check_decimal("growth.signup_credit", g.signup_credit)
    _check_decimal("growth.invite_credit", g.invite_credit)
    from accounting.growth import Terms

    try:
        Terms.of(g)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(str(exc))
    return g


def parse(data: dict[str, Any], path: str = "") -> Config:
    top = {
        "server", "database", "upstream", "ledger", "limits", "metrics", "admin", "demo",
        "growth", "accounts", "channels", "prices", "groups", "fallbacks",
    }
    unknown = sorted(set(data) - top)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sorted(top))})")
    server = _section(ServerConfig, "server", _positive_workers(data.get("server", {})))
    from relay.clientaddr import check as check_cidrs

    bad = check_cidrs(server.trusted_proxies)
    if bad is not None:
        raise ConfigError(f"server.trusted_proxies: expected addresses or CIDR blocks, got {bad!r}")
    channels = []
    names: set[str] = set()
    for i, raw in enumerate(data.get("channels", [])):
        ch = _section(ChannelConfig, f"channels[{i}]", raw)
        if ch.protocol not in ("openai", "anthropic"):
            raise ConfigError(f"channels[{i}].protocol: expected \"openai\" or \"anthropic\", got {ch.protocol!r}")
        if not ch.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"channels[{i}].base_url: expected an http(s) URL, got {ch.base_url!r}")
        if ch.name in names:
            raise ConfigError(f"channels[{i}].name: duplicate channel name {ch.name!r}")
        names.add(ch.name)
        channels.append(ch)
    prices = []
    raw_prices = data.get("prices", {})
    if not isinstance(raw_prices, dict):
        raise ConfigError("prices: expected a table of models")
    for model, raw in raw_prices.items():
        p = _section(Price, f"prices.{model}", raw)
        for f in fields(Price):
            v = getattr(p, f.name)
            if f.name == "max_output_tokens":
                if v > 1 << 24:
                    raise ConfigError(f"prices.{model}.max_output_tokens: at most {1 << 24}, got {v}")
                continue
            if f.name == "long_context_threshold":
                continue
            if v != "" or f.name in ("input", "output"):
                _check_decimal(f"prices.{model}.{f.name}", v)
        from accounting.pricing import row_from_price

        try:  # the tier's own rules (threshold range, all or nothing, never below base)
            row_from_price(model, p)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ConfigError(str(exc))
        prices.append((model, p))
    groups = []
    for i, raw in enumerate(data.get("groups", [])):
        g = _section(GroupConfig, f"groups[{i}]", raw)
        groups.append(g)
    raw_fb = data.get("fallbacks", {})
    if not isinstance(raw_fb, dict):
        raise ConfigError("fallbacks: expected a table of model = [fallback models]")
    fallbacks = tuple(
        (m, _coerce(f"fallbacks.{m}", "tuple[str, ...]", v)) for m, v in raw_fb.items()
    )
    return Config(
        server=server,
        database=_section(DatabaseConfig, "database", data.get("database", {})),
        upstream=_section(UpstreamConfig, "upstream", data.get("upstream", {})),
        ledger=_section(LedgerConfig, "ledger", data.get("ledger", {})),
        limits=_section(LimitsConfig, "limits", data.get("limits", {})),
        metrics=_section(MetricsConfig, "metrics", data.get("metrics", {})),
        admin=_section(AdminConfig, "admin", data.get("admin", {})),
        demo=_section(DemoConfig, "demo", data.get("demo", {})),
        growth=_growth(_section(GrowthConfig, "growth", data.get("growth", {}))),
        accounts=_accounts(_section(AccountsConfig, "accounts", data.get("accounts", {}))),
        channels=tuple(channels),
        prices=tuple(prices),
        groups=tuple(groups),
        fallbacks=fallbacks,
        path=path,
    )


def load(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: {exc}")
    return parse(data, str(p.resolve()))
