"""docs/configuration.md is what `python -m kvblend.docs_config` writes from the settings' owners, and every
connector and pipeline setting has its line there."""

from dataclasses import fields

from kvblend import docs_config
from kvblend.rag.config import PipelineConfig
from kvblend.vllm.config import ConnectorConfig


def test_configuration_page_is_generated():
    assert docs_config.PAGE.read_text(encoding="utf-8") == docs_config.page(), (
        "docs/configuration.md is stale: run `python -m kvblend.docs_config`")


def test_every_connector_and_pipeline_setting_is_described():
    for cls, described in ((ConnectorConfig, docs_config.CONNECTOR), (PipelineConfig, docs_config.PIPELINE)):
        assert list(described) == [f.name for f in fields(cls)], f"{cls.__name__}'s settings and their descriptions"


def test_check_flags_a_stale_page(tmp_path, monkeypatch):
    page = tmp_path / "configuration.md"
    monkeypatch.setattr(docs_config, "PAGE", page)
    assert docs_config.main(["--check"]) == 1
    assert docs_config.main([]) == 0 and docs_config.main(["--check"]) == 0
    page.write_text(page.read_text(encoding="utf-8") + "edited\n", encoding="utf-8")
    assert docs_config.main(["--check"]) == 1
