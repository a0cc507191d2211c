"""Settings: defaults, URL normalisation, and bad values that stop the service at startup by name."""

from pathlib import Path

import pytest

from agent_app import Settings, SettingsError, create_app, load_settings


@pytest.fixture(autouse=True)
def no_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Read only the variables a test sets: no developer .env, no inherited service variables."""
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def test_defaults_work_with_a_local_vllm() -> None:
    settings = load_settings()
    assert (settings.vllm_base_url, settings.vllm_model, settings.tool_call_format, settings.agent_max_steps) == (
        "http://localhost:8000", "Qwen/Qwen2.5-7B-Instruct", "auto", 8)
    assert settings.allowed_origins == ["http://localhost:5173"]
    assert settings.sampling() == {}


@pytest.mark.parametrize("url", ["http://vllm:8000", "http://vllm:8000/", "http://vllm:8000/v1",
                                 " http://vllm:8000/v1/ "])
def test_base_url_keeps_only_the_server_root(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_BASE_URL", url)
    assert load_settings().vllm_base_url == "http://vllm:8000"


def test_sampling_sends_only_what_was_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEMPERATURE", "0.7")
    monkeypatch.setenv("MAX_TOKENS", "512")
    assert load_settings().sampling() == {"temperature": 0.7, "max_tokens": 512}


def test_allowed_origins_is_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_ORIGINS", '["https://a.example", "https://b.example"]')
    assert load_settings().allowed_origins == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("AGENT_MAX_STEPS", "0", "invalid settings: AGENT_MAX_STEPS: Input should be greater than or equal to 1"),
        ("TOOL_CALL_FORMAT", "xml", "invalid settings: TOOL_CALL_FORMAT: Input should be 'auto', 'native' or 'hermes'"),
        ("VLLM_TIMEOUT_S", "soon", "invalid settings: VLLM_TIMEOUT_S: Input should be a valid number, unable to parse "
                                   "string as a number"),
        ("VLLM_BASE_URL", "localhost:8000", "invalid settings: VLLM_BASE_URL: Value error, must be an http(s) URL such "
                                            "as http://localhost:8000, got 'localhost:8000'"),
        ("DATABASE_URL", "sqlite:///x.db", "invalid settings: DATABASE_URL: Value error, must start with "
                                           "sqlite+aiosqlite:// or postgresql+asyncpg://"),
        ("DATABASE_URL", "sqlite+aiosqlite://", "invalid settings: DATABASE_URL: Value error, must name a database "
                                                "file (sqlite+aiosqlite:///path/to/conversations.db), not an "
                                                "in-memory database"),
    ],
)
def test_a_bad_value_fails_at_startup_naming_the_variable(
    name: str, value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        create_app()
    assert str(caught.value) == message


def test_secrets_are_not_shown_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "vllm-secret")
    monkeypatch.setenv("API_KEY", "service-secret")
    text = repr(load_settings())
    assert "vllm-secret" not in text and "service-secret" not in text
