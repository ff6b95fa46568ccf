"""No credentials in logs, errors or reprs outside the store: configs, the Redis check, the engine's connector
settings (the Redis URL reaches the connector through an environment variable, not vLLM's logged config)."""

import json
import logging
import socket

import pytest

from kvblend.rag.config import ENGINE_REDIS_URL_ENV, PipelineConfig, RedisUnreachable, require_redis
from kvblend.vllm.config import ConnectorConfig

PASSWORD = "hunter2-s3cret"
TENANT = "tenant-secret-0123456789"


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://user:{PASSWORD}@127.0.0.1:{sock.getsockname()[1]}/0"


def test_unreachable_redis_error_hides_the_password():
    url = closed_port_url()
    with pytest.raises(RedisUnreachable, match="is unreachable") as err:
        require_redis(url, timeout_s=0.5)
    assert PASSWORD not in str(err.value) and "user:***@127.0.0.1" in str(err.value)


def test_config_reprs_hide_passwords_and_secrets(tmp_path):
    url = closed_port_url()
    pipeline = PipelineConfig(index_dir=tmp_path / "i", store_dir=tmp_path / "s", redis_url=url, tenant_secret=TENANT)
    connector = ConnectorConfig(store_dir=str(tmp_path / "s"), redis_url=url)
    for config in (pipeline, connector, connector.store_config()):
        shown = repr(config)
        assert PASSWORD not in shown and TENANT not in shown and "***" in shown, shown
    assert "tenant_secret" not in repr(pipeline) and "namespace='default'" in repr(pipeline)


def test_the_engine_gets_the_redis_url_through_the_environment(tmp_path, monkeypatch):
    url = closed_port_url()
    pipeline = PipelineConfig(index_dir=tmp_path / "i", store_dir=tmp_path / "s", redis_url=url)
    extra = pipeline.connector_extra()
    assert PASSWORD not in json.dumps(extra) and extra["redis_url_env"] == ENGINE_REDIS_URL_ENV
    monkeypatch.setenv(ENGINE_REDIS_URL_ENV, url)  # what start_llm does before vLLM starts
    assert ConnectorConfig.from_extra(extra).store_config().redis_url == url
    assert "redis_url_env" not in PipelineConfig(index_dir=tmp_path / "i", store_dir=tmp_path / "s").connector_extra()


def test_redis_url_env_is_checked(monkeypatch):
    monkeypatch.delenv("KVBLEND_TEST_NO_SUCH_URL", raising=False)
    with pytest.raises(ValueError, match="KVBLEND_TEST_NO_SUCH_URL, which is not set"):
        ConnectorConfig(redis_url_env="KVBLEND_TEST_NO_SUCH_URL")
    monkeypatch.setenv("KVBLEND_TEST_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="not both"):
        ConnectorConfig(redis_url="redis://127.0.0.1:1/0", redis_url_env="KVBLEND_TEST_URL")
    monkeypatch.setenv("KVBLEND_TEST_URL", f"http://:{PASSWORD}@x")
    with pytest.raises(ValueError, match="Redis URL") as err:
        ConnectorConfig(redis_url_env="KVBLEND_TEST_URL")
    assert PASSWORD not in str(err.value)


def test_a_password_in_the_connector_config_is_warned_about(tmp_path, caplog):
    """vLLM logs kv_connector_extra_config at start-up: a Redis URL with a password there gets a warning naming
    the fix (redis_url_env), itself without the password."""
    with caplog.at_level(logging.WARNING, logger="kvblend.vllm.config"):
        ConnectorConfig.from_extra({"store_dir": str(tmp_path / "s"), "redis_url": closed_port_url()})
    assert "redis_url_env" in caplog.text and "user:***@" in caplog.text and PASSWORD not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvblend.vllm.config"):
        ConnectorConfig.from_extra({"store_dir": str(tmp_path / "s"), "redis_url": "redis://127.0.0.1:1/0"})
    assert not caplog.records
