"""Without an engine: the kvblend request parameters that name documents, where they are found in a prompt, and
the vLLM server flags `kvblend serve` runs with (parsed by vLLM's own server parser)."""

import pytest

from kvblend.client import blend_body, rag_messages, rag_user_message
from kvblend.rag.config import DEFAULT_ENGINE_ARGS, DEFAULT_SAMPLING, PipelineConfig
from kvblend.vllm.params import BLEND_SALT, locate_documents, parse_params


def test_documents_are_texts_or_token_ids_and_exclude_chunks():
    params = parse_params({"kvblend": {"documents": ["some text", [5, 6, 7]]}}, prompt_len=20)
    assert params.documents == ("some text", (5, 6, 7)) and params.chunks is None
    for bad in ([], ["  "], [[]], [[1, -2]], "text", [3.5]):
        with pytest.raises(ValueError, match="documents? "):
            parse_params({"kvblend": {"documents": bad}}, prompt_len=20)
    with pytest.raises(ValueError, match="either chunks"):
        parse_params({"kvblend": {"documents": ["a"], "chunks": [[0, 2]]}}, prompt_len=20)


def test_documents_are_located_in_order_without_overlap():
    prompt = [9, 1, 2, 3, 9, 4, 5, 9, 1, 2, 3, 9]
    assert locate_documents(prompt, [[1, 2, 3], [4, 5], [1, 2, 3]]) == [(1, 3), (5, 2), (8, 3)]
    assert locate_documents(prompt, [[4, 5], [1, 2, 3]]) == [(5, 2), (8, 3)], "searched after the previous one"
    assert locate_documents(prompt, [[4, 5], [4, 5], [7]]) == [(5, 2), None, None]


def test_client_layout_and_request_body():
    docs = ["First document.", "Second document."]
    assert rag_user_message("Why?", docs) == "First document.\n\nSecond document.\n\n\n\nQuestion: Why?"
    assert [m["role"] for m in rag_messages("Why?", docs)] == ["system", "user"]
    body, other = blend_body(docs, ratio=0.2), blend_body([[1, 2]])
    assert body["kv_transfer_params"] == {"kvblend": {"documents": docs, "ratio": 0.2}}
    assert body["cache_salt"].startswith(BLEND_SALT) and body["cache_salt"] != other["cache_salt"]
    assert other["kv_transfer_params"]["kvblend"]["documents"] == [[1, 2]]
    assert "documents" not in blend_body()["kv_transfer_params"]["kvblend"]
    with pytest.raises(ValueError, match="question is empty"):
        rag_user_message(" ", docs)


def test_serve_flags_parse_with_vllms_server_parser(tmp_path):
    from kvblend.server import server_args, vllm_server_parser

    config = PipelineConfig(store_dir=tmp_path / "store", ratio=0.2)
    flags = server_args(tmp_path / "model", config, port=8123, vllm_args=["--max-model-len", "2048"])
    args = vllm_server_parser().parse_args(flags)
    assert args.model == str(tmp_path / "model") and args.port == 8123 and args.load_format == "kvblend"
    assert args.max_model_len == 2048, "flags after the pipeline's win"
    assert args.dtype == DEFAULT_ENGINE_ARGS["dtype"] and args.enable_prefix_caching and args.enforce_eager
    assert args.async_scheduling is False and args.enable_prompt_tokens_details
    assert args.override_generation_config == DEFAULT_SAMPLING
    kv = args.kv_transfer_config
    extra = kv.kv_connector_extra_config
    assert kv.kv_connector_module_path == "kvblend.vllm.connector" and kv.kv_load_failure_policy == "recompute"
    assert extra["store_dir"] == str(tmp_path / "store") and extra["ratio"] == 0.2 and extra["mode"] == "blend"


def test_discover_blend_is_off_unless_serve_asks(tmp_path):
    from kvblend.cli import build_parser
    from kvblend.server import server_args, vllm_server_parser

    config = PipelineConfig(store_dir=tmp_path / "store")
    for flag, expected in (([], None), (["--discover-blend"], True)):
        args = build_parser().parse_args(["serve", *flag])
        flags = server_args(tmp_path / "model", config, discover_blend=args.discover_blend)
        extra = vllm_server_parser().parse_args(flags).kv_transfer_config.kv_connector_extra_config
        assert extra.get("discover_blend") is expected
