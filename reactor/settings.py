"""Process configuration: one validated `Settings` object, built at startup from the environment and `.env`.

Nothing here runs at import time. `load_settings()` reports every missing or invalid variable at once, by the
variable's name, in a `SettingsError`; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import phonenumbers
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Lead columns that PERSON_FIELD_MAP may send to a custom field of Twenty's Person.
MAPPABLE_LEAD_COLUMNS = frozenset(
    {"current_credit", "salary_min", "salary_max", "employer", "employment_status", "state", "country",
     "postal_code", "street", "source", "utm_source", "utm_medium", "utm_campaign", "vehicle_make",
     "vehicle_model", "vehicle_year", "lead_id"}
)  # fmt: skip


class SettingsError(Exception):
    """The configuration is unusable; the message names every offending variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=False, frozen=True)

    # PostgreSQL: DATABASE_URL wins over the DB_* parts.
    database_url: str | None = Field(None, validation_alias="DATABASE_URL")
    db_host: str = Field("127.0.0.1", validation_alias="DB_HOST")
    db_port: int = Field(5432, ge=1, le=65535, validation_alias="DB_PORT")
    db_name: str = Field("reactor", validation_alias="DB_NAME")
    db_user: str = Field("postgres", validation_alias="DB_USER")
    db_password: SecretStr = Field(SecretStr(""), validation_alias="DB_PASSWORD")
    db_pool_size: int = Field(10, ge=1, le=200, validation_alias="DB_POOL_SIZE")

    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")

    # Lead sources: "source1:key1,source2:key2".
    lead_api_keys: Annotated[dict[str, SecretStr], NoDecode] = Field(validation_alias="LEAD_API_KEYS")
    default_phone_region: str = Field("US", validation_alias="DEFAULT_PHONE_REGION")

    twenty_rest_url: str | None = Field(None, validation_alias="TWENTY_REST_URL")
    twenty_rest_token: SecretStr | None = Field(None, validation_alias="TWENTY_REST_TOKEN")
    twenty_batch_size: int = Field(200, ge=1, le=200, validation_alias="TWENTY_BATCH_SIZE")
    twenty_rate_limit: int = Field(100, ge=1, validation_alias="TWENTY_RATE_LIMIT")
    twenty_rate_window_s: float = Field(60.0, gt=0, validation_alias="TWENTY_RATE_WINDOW_S")
    # Lead column -> custom Person field, e.g. "current_credit:budget". Only named columns are sent.
    person_field_map: Annotated[dict[str, str], NoDecode] = Field({}, validation_alias="PERSON_FIELD_MAP")
    restore_deleted_people: bool = Field(False, validation_alias="RESTORE_DELETED_PEOPLE")
    sync_sweep_s: int = Field(30, ge=1, validation_alias="SYNC_SWEEP_S")
    sync_max_tries: int = Field(8, ge=1, le=50, validation_alias="SYNC_MAX_TRIES")
    # How long a worker holds the leads it is pushing; a killed worker's leads are pushed again after it.
    sync_lease_s: float = Field(30.0, ge=1, le=3600, validation_alias="SYNC_LEASE_S")
    sync_retry_base_s: float = Field(5.0, gt=0, le=3600, validation_alias="SYNC_RETRY_BASE_S")
    twenty_max_attempts: int = Field(4, ge=1, le=10, validation_alias="TWENTY_MAX_ATTEMPTS")
    twenty_webhook_secret: SecretStr | None = Field(None, validation_alias="TWENTY_WEBHOOK_SECRET")
    webhook_tolerance_s: int = Field(300, ge=1, le=86400, validation_alias="WEBHOOK_TOLERANCE_S")
    # Task statuses that count as a member's load.
    load_statuses: Annotated[tuple[str, ...], NoDecode] = Field(("TODO",), validation_alias="LOAD_STATUSES")
    # Who may be assigned follow-ups (workspace members' emails); empty: every member.
    assignee_emails: Annotated[frozenset[str], NoDecode] = Field(frozenset(), validation_alias="ASSIGNEE_EMAILS")
    # Capacity weights, "email:weight,…": a member's load is divided by their weight (default 1).
    assignee_weights: Annotated[dict[str, float], NoDecode] = Field({}, validation_alias="ASSIGNEE_WEIGHTS")
    # Reconcile on a schedule: a five-field cron expression (UTC), e.g. "15 3 * * *". Empty: on demand only.
    reconcile_cron: str | None = Field(None, validation_alias="RECONCILE_CRON")
    # Routing: who takes a follow-up when nobody is available (else it waits), caps, SLA re-assignment.
    fallback_assignee_email: str | None = Field(None, validation_alias="FALLBACK_ASSIGNEE_EMAIL")
    member_max_open_tasks: int = Field(0, ge=0, validation_alias="MEMBER_MAX_OPEN_TASKS")  # 0: no cap
    follow_up_sla_hours: float = Field(0.0, ge=0, le=24 * 30, validation_alias="FOLLOW_UP_SLA_HOURS")  # 0: off
    max_reassignments: int = Field(2, ge=0, le=20, validation_alias="MAX_REASSIGNMENTS")
    follow_up_due_hours: float = Field(24.0, gt=0, le=24 * 365, validation_alias="FOLLOW_UP_DUE_HOURS")
    enable_llm_copywriting: bool = Field(False, validation_alias="ENABLE_LLM_COPYWRITING")
    ollama_url: str = Field("http://localhost:11434", validation_alias="OLLAMA_URL")
    ollama_model: str = Field("llama3.1:8b", min_length=1, validation_alias="OLLAMA_MODEL")
    llm_timeout_s: float = Field(20.0, gt=0, le=600, validation_alias="LLM_TIMEOUT_S")

    log_level: str = Field("INFO", validation_alias="LOG_LEVEL")
    log_format: Literal["json", "text"] = Field("json", validation_alias="LOG_FORMAT")
    log_pii: bool = Field(False, validation_alias="LOG_PII")  # log emails and phones unmasked
    # The worker's /metrics port (it has no HTTP server otherwise); 0: off.
    worker_metrics_port: int = Field(0, ge=0, le=65535, validation_alias="WORKER_METRICS_PORT")

    @field_validator("database_url", mode="before")
    @classmethod
    def _check_database_url(cls, value: Any) -> Any:
        if value in (None, ""):
            return None
        if not str(value).startswith(("postgres://", "postgresql://")):
            raise ValueError("must start with postgresql://")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("lead_api_keys", mode="before")
    @classmethod
    def _parse_lead_api_keys(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        keys: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            source, sep, key = item.partition(":")
            source, key = source.strip(), key.strip()
            if not sep or not source or not key:
                raise ValueError("each entry must be source:key, entries separated by commas")
            if source in keys:
                raise ValueError(f"source {source!r} is listed twice")
            keys[source] = key
        if not keys:
            raise ValueError("at least one source:key is required")
        return keys

    @field_validator("person_field_map", mode="before")
    @classmethod
    def _parse_field_map(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        mapping: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            column, sep, field = (piece.strip() for piece in item.partition(":"))
            if not sep or column not in MAPPABLE_LEAD_COLUMNS or not field.isidentifier():
                raise ValueError(
                    f"{item!r}: each entry must be lead_column:personField, the column one of "
                    + ", ".join(sorted(MAPPABLE_LEAD_COLUMNS))
                )
            mapping[column] = field
        return mapping

    @field_validator("load_statuses", mode="before")
    @classmethod
    def _parse_statuses(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        statuses = tuple(dict.fromkeys(s.strip().upper() for s in value.split(",") if s.strip()))
        unknown = [s for s in statuses if s not in {"TODO", "IN_PROGRESS", "DONE"}]
        if not statuses or unknown:
            raise ValueError("a comma-separated list of TODO, IN_PROGRESS, DONE")
        return statuses

    @field_validator("assignee_emails", mode="before")
    @classmethod
    def _parse_emails(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return frozenset(e.strip().lower() for e in value.split(",") if e.strip())

    @field_validator("assignee_weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        weights: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            email, _, weight = item.rpartition(":")
            try:
                number = float(weight)
            except ValueError:
                number = 0.0
            if not email.strip() or not number > 0:
                raise ValueError(f"{item!r}: each entry must be email:weight with a weight above 0, e.g. a@x.com:2")
            weights[email.strip().lower()] = number
        return weights

    @field_validator("fallback_assignee_email", mode="before")
    @classmethod
    def _check_fallback(cls, value: Any) -> Any:
        if value in (None, ""):
            return None
        email = str(value).strip().lower()
        if "@" not in email:
            raise ValueError("must be a workspace member's email")
        return email

    def routing_emails(self) -> set[str]:
        """Every member email the routing settings name (checked against Twenty's members at worker start)."""
        named = set(self.assignee_emails) | set(self.assignee_weights)
        return named | ({self.fallback_assignee_email} if self.fallback_assignee_email else set())

    @field_validator("reconcile_cron")
    @classmethod
    def _check_cron(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        from reactor.reconcile import parse_cron

        parse_cron(value)
        return value.strip()

    @field_validator("ollama_url")
    @classmethod
    def _check_ollama_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL, e.g. http://localhost:11434")
        return value.rstrip("/")

    @field_validator("default_phone_region")
    @classmethod
    def _check_region(cls, value: str) -> str:
        region = value.strip().upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not an ISO 3166 region phonenumbers knows, e.g. US, GB, FR")
        return region

    @field_validator("twenty_rest_url", mode="before")
    @classmethod
    def _check_twenty_url(cls, value: Any) -> Any:
        if value in (None, ""):
            return None
        url = str(value).strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL, e.g. https://api.twenty.com/rest")
        # Older configs name the server root; the REST root is below it.
        return url if url.endswith("/rest") else f"{url}/rest"

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    @property
    def postgres_dsn(self) -> str:
        """The DSN asyncpg connects with: DATABASE_URL, or one built from the DB_* parts."""
        if self.database_url:
            return self.database_url
        user = quote(self.db_user, safe="")
        password = self.db_password.get_secret_value()
        auth = f"{user}:{quote(password, safe='')}" if password else user
        return f"postgresql://{auth}@{self.db_host}:{self.db_port}/{quote(self.db_name, safe='')}"


def load_settings(env_file: Path | None = Path(".env"), **overrides: Any) -> Settings:
    """Build `Settings` from the environment (and `env_file` if it exists), or raise one `SettingsError`.

    `overrides` are given by variable name (e.g. ``LEAD_API_KEYS="web:k"``) and win over the environment.
    """
    env_files = (env_file,) if env_file is not None and env_file.is_file() else ()
    try:
        return Settings(_env_file=env_files or None, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    aliases = _aliases()
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        name = aliases.get(field, field)
        message = "is required but not set" if error["type"] == "missing" else error["msg"]
        message = message.removeprefix("Value error, ")
        lines.append(f"  {name}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def _aliases() -> Mapping[str, str]:
    names: dict[str, str] = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        names[field] = alias if isinstance(alias, str) else field.upper()
    return names
