"""Settings, read once from the environment into one typed object.

Every variable of the specification, plus ``EVENT_STORE_URL``. A bad value is a
:class:`~collaborative_blocks.errors.ConfigurationError` that names the variable and the
accepted values. Components receive the object; they never read ``os.environ`` themselves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from collaborative_blocks.errors import ConfigurationError

__all__ = ["DEFAULT_EVENT_STORE_URL", "Settings", "load_settings"]

DEFAULT_EVENT_STORE_URL = "sqlite+aiosqlite:///cb-data/events.db"


class Settings(BaseSettings):
    """The framework's configuration (environment variables in capitals)."""

    model_config = SettingsConfigDict(
        case_sensitive=False, frozen=True, extra="ignore", env_prefix=""
    )

    event_store_url: str = Field(
        DEFAULT_EVENT_STORE_URL,
        description="a store URL: sqlite+aiosqlite:///PATH (default), "
        "postgresql+asyncpg://USER@HOST/DB, memory://, or a scheme a plugin provides",
    )
    message_broker_url: str | None = Field(
        None,
        description="a transport URL: memory://, redis://HOST:PORT, nats://HOST:PORT, "
        "log+STORE_URL, or a scheme a plugin provides; unset = in-process",
    )
    message_ttl_seconds: int = Field(
        3600, gt=0, description="an integer > 0: default time-to-live of messages in seconds"
    )
    message_clock_skew_seconds: float = Field(
        30,
        ge=0,
        description="a number >= 0: how far apart the clocks of two systems may be; a message "
        "expires this many seconds after its ttl ran out by its sender's clock, so a receiver "
        "whose clock is ahead does not drop it early",
    )
    max_retry_attempts: int = Field(
        3, ge=0, description="an integer >= 0: redeliveries before a message is dead-lettered"
    )
    circuit_breaker_failure_threshold: int = Field(
        5, gt=0, description="an integer > 0: failures that open a circuit breaker"
    )
    circuit_breaker_timeout_seconds: float = Field(
        60, gt=0, description="a number > 0: seconds an open breaker waits before half-open"
    )
    zero_trust_enabled: bool = Field(
        True, description="true/false (also 1/0, yes/no, on/off): verify every request"
    )
    security_verification_timeout: float = Field(
        5, gt=0, description="a number > 0: seconds a security verification may take"
    )
    distributed_tracing_enabled: bool = Field(
        True, description="true/false (also 1/0, yes/no, on/off): emit OpenTelemetry spans"
    )
    metrics_collection_interval: float = Field(
        30, gt=0, description="a number > 0: seconds between metric exports"
    )

    @field_validator("event_store_url", "message_broker_url")
    @classmethod
    def _url_has_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value:
            return None
        if "://" not in value:
            raise ValueError(
                f"{value!r} is not a URL; write SCHEME://..., e.g. sqlite+aiosqlite:///events.db, "
                "postgresql+asyncpg://postgres@127.0.0.1/db, memory://, redis://localhost:6379"
            )
        return value


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read :class:`Settings` from ``environ`` (default: the process environment).

    Raises :class:`ConfigurationError` naming each bad variable and what it accepts.
    """
    source = os.environ if environ is None else environ
    names = set(Settings.model_fields)
    values: dict[str, Any] = {
        key.lower(): value for key, value in source.items() if key.lower() in names
    }
    values.update(overrides)
    try:
        # _env_prefix trick: read only what we pass, so tests with an explicit environ are
        # not influenced by the process environment.
        return Settings.model_validate(values) if environ is not None else Settings(**overrides)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            name = str(item["loc"][0]).upper() if item["loc"] else "?"
            field = Settings.model_fields.get(name.lower())
            accepted = field.description if field is not None else ""
            problems.append(
                f"{name}={item.get('input')!r}: {item['msg']}"
                + (f" (accepted: {accepted})" if accepted else "")
            )
        raise ConfigurationError("invalid settings: " + "; ".join(problems)) from None
