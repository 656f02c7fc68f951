"""Settings: one validated object, every problem reported at once by variable name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reactor.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "DATABASE_URL",
        "DB_HOST",
        "DB_PORT",
        "DB_NAME",
        "DB_USER",
        "DB_PASSWORD",
        "REDIS_URL",
        "LEAD_API_KEYS",
        "TWENTY_REST_URL",
        "TWENTY_REST_TOKEN",
        "DEFAULT_PHONE_REGION",
    ):
        monkeypatch.delenv(name, raising=False)


def test_every_bad_variable_is_reported_together() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(None, DB_PORT="five", DEFAULT_PHONE_REGION="XX", REDIS_URL="http://x", DATABASE_URL="mysql://")
    message = str(caught.value)
    for name in ("DB_PORT", "DEFAULT_PHONE_REGION", "REDIS_URL", "DATABASE_URL", "LEAD_API_KEYS"):
        assert f"  {name}: " in message
    assert "LEAD_API_KEYS: is required but not set" in message


def test_database_url_wins_over_the_parts() -> None:
    parts = load_settings(
        None,
        LEAD_API_KEYS="a:k",
        DB_HOST="db.internal",
        DB_USER="app",
        DB_PASSWORD="p@ss/word",
        DB_NAME="leads",
        DB_PORT="6543",
    )
    assert parts.postgres_dsn == "postgresql://app:p%40ss%2Fword@db.internal:6543/leads"
    url = load_settings(None, LEAD_API_KEYS="a:k", DB_HOST="db.internal", DATABASE_URL="postgresql://u@h/d")
    assert url.postgres_dsn == "postgresql://u@h/d"


def test_lead_api_keys_name_their_sources() -> None:
    settings = load_settings(None, LEAD_API_KEYS=" webform:k1 , ads:k2:with-colon ")
    assert {s: k.get_secret_value() for s, k in settings.lead_api_keys.items()} == {
        "webform": "k1",
        "ads": "k2:with-colon",
    }
    for bad in ("nokey", "a:k,a:k2", ":k", " , "):
        with pytest.raises(SettingsError, match="LEAD_API_KEYS"):
            load_settings(None, LEAD_API_KEYS=bad)


def test_secrets_do_not_show_in_repr() -> None:
    settings = load_settings(None, LEAD_API_KEYS="a:supersecret", DB_PASSWORD="hunter2", TWENTY_REST_TOKEN="tok")
    assert "supersecret" not in repr(settings)
    assert "hunter2" not in repr(settings)
    assert "tok'" not in repr(settings)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://api.twenty.com/rest", "https://api.twenty.com/rest"),
        ("https://api.twenty.com/", "https://api.twenty.com/rest"),
        ("http://localhost:3000", "http://localhost:3000/rest"),
    ],
)
def test_twenty_url_is_completed_to_the_rest_root(given: str, expected: str) -> None:
    assert load_settings(None, LEAD_API_KEYS="a:k", TWENTY_REST_URL=given).twenty_rest_url == expected


def test_env_file_is_read_and_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("LEAD_API_KEYS=fromfile:k\nDEFAULT_PHONE_REGION=gb\nENABLE_LLM_COPYWRITING=true\n")
    settings = load_settings(env_file)
    assert set(settings.lead_api_keys) == {"fromfile"}
    assert settings.default_phone_region == "GB"
    assert settings.enable_llm_copywriting is True
    monkeypatch.setenv("LEAD_API_KEYS", "fromenv:k")
    assert set(load_settings(env_file).lead_api_keys) == {"fromenv"}


def test_the_cli_exits_2_naming_the_problem(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "DB_PORT": "nope"}
    result = subprocess.run(
        [sys.executable, "-m", "reactor", "migrate"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "DB_PORT" in result.stderr
    assert "LEAD_API_KEYS: is required" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_variable_is_documented_in_env_example_and_readme() -> None:
    root = Path(__file__).resolve().parent.parent
    names = {str(field.validation_alias) for field in Settings.model_fields.values()}
    example = (root / ".env.example").read_text()
    readme = (root / "docs" / "configuration.md").read_text()  # the README's settings table moved there
    documented = {line.lstrip("# ").split("=", 1)[0] for line in example.splitlines() if "=" in line}
    assert names <= documented, names - documented
    assert all(f"`{name}`" in readme for name in names), [n for n in names if f"`{n}`" not in readme]


def test_assignment_settings_are_parsed_and_checked() -> None:
    parsed = load_settings(
        None,
        LEAD_API_KEYS="a:b",
        LOAD_STATUSES="todo, IN_PROGRESS",
        ASSIGNEE_EMAILS="Ann@Acme.com, bob@acme.com",
        ASSIGNEE_WEIGHTS="ann@acme.com:2,bob@acme.com:0.5",
        OLLAMA_URL="http://gpu-box:11434/",
    )
    assert parsed.load_statuses == ("TODO", "IN_PROGRESS")
    assert parsed.assignee_emails == {"ann@acme.com", "bob@acme.com"}
    assert parsed.assignee_weights == {"ann@acme.com": 2.0, "bob@acme.com": 0.5}
    assert parsed.ollama_url == "http://gpu-box:11434"
    with pytest.raises(SettingsError) as raised:
        load_settings(None, LEAD_API_KEYS="a:b", LOAD_STATUSES="OPEN", ASSIGNEE_WEIGHTS="ann@acme.com:0")
    message = str(raised.value)
    assert "LOAD_STATUSES" in message
    assert "ASSIGNEE_WEIGHTS" in message
