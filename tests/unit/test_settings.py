from __future__ import annotations

import pytest

from collaborative_blocks import ConfigurationError, Runtime, load_settings
from collaborative_blocks.core.settings import DEFAULT_EVENT_STORE_URL
from collaborative_blocks.errors import UnknownSchemeError


def test_defaults_are_the_specifications() -> None:
    settings = load_settings({})
    assert settings.event_store_url == DEFAULT_EVENT_STORE_URL
    assert settings.message_broker_url is None
    assert settings.message_ttl_seconds == 3600
    assert settings.max_retry_attempts == 3
    assert settings.circuit_breaker_failure_threshold == 5
    assert settings.circuit_breaker_timeout_seconds == 60
    assert settings.zero_trust_enabled is True
    assert settings.security_verification_timeout == 5
    assert settings.distributed_tracing_enabled is True
    assert settings.metrics_collection_interval == 30


def test_environment_values_are_parsed() -> None:
    settings = load_settings(
        {
            "EVENT_STORE_URL": "memory://",
            "MESSAGE_BROKER_URL": "redis://localhost:6379",
            "MAX_RETRY_ATTEMPTS": "7",
            "ZERO_TRUST_ENABLED": "false",
            "DISTRIBUTED_TRACING_ENABLED": "0",
            "CIRCUIT_BREAKER_TIMEOUT_SECONDS": "2.5",
            "UNRELATED": "ignored",
        }
    )
    assert settings.event_store_url == "memory://"
    assert settings.message_broker_url == "redis://localhost:6379"
    assert settings.max_retry_attempts == 7
    assert settings.zero_trust_enabled is False
    assert settings.distributed_tracing_enabled is False
    assert settings.circuit_breaker_timeout_seconds == 2.5


def test_process_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESSAGE_TTL_SECONDS", "12")
    assert load_settings().message_ttl_seconds == 12


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("MAX_RETRY_ATTEMPTS", "-1", "integer >= 0"),
        ("MAX_RETRY_ATTEMPTS", "three", "integer >= 0"),
        ("ZERO_TRUST_ENABLED", "maybe", "true/false"),
        ("DISTRIBUTED_TRACING_ENABLED", "2", "true/false"),
        ("MESSAGE_TTL_SECONDS", "0", "integer > 0"),
        ("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "0", "integer > 0"),
        ("EVENT_STORE_URL", "events.db", "sqlite+aiosqlite"),
        ("MESSAGE_BROKER_URL", "localhost:6379", "redis://"),
    ],
)
def test_bad_value_names_the_variable_and_what_is_accepted(
    name: str, value: str, accepted: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings({name: value})
    message = str(raised.value)
    assert name in message
    assert repr(value) in message
    assert accepted in message


def test_settings_are_immutable() -> None:
    settings = load_settings({})
    with pytest.raises(Exception, match="frozen"):
        settings.max_retry_attempts = 9  # type: ignore[misc]


async def test_unknown_store_scheme_names_the_variable() -> None:
    runtime = Runtime(load_settings({"EVENT_STORE_URL": "cassandra://db/events"}))
    with pytest.raises(UnknownSchemeError) as raised:
        await runtime.store()
    assert "EVENT_STORE_URL" in str(raised.value)
    assert "'cassandra'" in str(raised.value)
    assert "memory" in str(raised.value)


async def test_password_in_url_is_not_repeated_in_errors() -> None:
    runtime = Runtime(load_settings({"EVENT_STORE_URL": "cassandra://app:s3cret@db/events"}))
    with pytest.raises(UnknownSchemeError) as raised:
        await runtime.store()
    assert "s3cret" not in str(raised.value)
