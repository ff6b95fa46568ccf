"""Without an engine: the kvblend request parameters that name documents, where they are found in a prompt, and
the vLLM server flags `kvblend serve` runs with (parsed by vLLM's own server parser): sized as the pipeline sizes
its engine, printed without converting the embedded model, refused before start where the machine cannot hold it."""

import pytest

from kvblend.client import blend_body, rag_messages, rag_user_message
from kvblend.model.embedded import model_config, resolve_model_dir
from kvblend.model.spec import spec_from_config
from kvblend.rag.config import DEFAULT_ENGINE_ARGS, DEFAULT_SAMPLING, ENGINE_REDIS_URL_ENV, PipelineConfig
from kvblend.rag.kv_space import kv_space_bytes
from kvblend.vllm.params import BLEND_SALT, locate_documents, parse_params


@pytest.fixture(scope="module")
def model():
    """The embedded model's directory, converted or not: the server flags need its config only."""
    return resolve_model_dir(None, convert=False)


def test_documents_are_texts_or_token_ids_and_exclude_chunks():
    params = parse_params({"kvblend": {"documents": ["some text", [5, 6, 7]]}}, prompt_len=20)
    assert params.documents == ("some text", (5, 6, 7)) and params.chunks is None
    for bad in ([], ["  "], [[]], [[1, -2]], "text", [3.5]):
        with pytest.raises(ValueError, match="documents? "):
            parse_params({"kvblend": {"documents": bad}}, prompt_len=20)
    with pytest.raises(ValueError, match="either chunks"):
        parse_params({"kvblend": {"documents": ["a"], "chunks": [[0, 2]]}}, prompt_len=20)


def test_profile_is_a_boolean_request_parameter():
    assert parse_params({"kvblend": {"profile": True}}, prompt_len=20).profile is True
    assert parse_params({"kvblend": {}}, prompt_len=20).profile is False
    for bad in ("yes", 1.5, None):
        with pytest.raises(ValueError, match="profile must be true or false"):
            parse_params({"kvblend": {"profile": bad}}, prompt_len=20)


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


def test_serve_flags_parse_with_vllms_server_parser(tmp_path, model):
    from kvblend.server import server_args, vllm_server_parser

    config = PipelineConfig(store_dir=tmp_path / "store", ratio=0.2)
    flags = server_args(model, config, port=8123, vllm_args=["--max-model-len", "2048"])
    args = vllm_server_parser().parse_args(flags)
    assert args.model == str(model) and args.port == 8123 and args.load_format == "kvblend"
    assert args.max_model_len == 2048, "flags after the pipeline's win"
    assert args.dtype == DEFAULT_ENGINE_ARGS["dtype"] and args.enable_prefix_caching and args.enforce_eager
    assert args.async_scheduling is False and args.enable_prompt_tokens_details
    assert args.override_generation_config == DEFAULT_SAMPLING
    kv = args.kv_transfer_config
    extra = kv.kv_connector_extra_config
    assert kv.kv_connector_module_path == "kvblend.vllm.connector" and kv.kv_load_failure_policy == "recompute"
    assert extra["store_dir"] == str(tmp_path / "store") and extra["ratio"] == 0.2 and extra["mode"] == "blend"


def test_discover_blend_is_off_unless_serve_asks(tmp_path, model):
    from kvblend.cli import build_parser
    from kvblend.server import server_args, vllm_server_parser

    config = PipelineConfig(store_dir=tmp_path / "store")
    for flag, expected in (([], None), (["--discover-blend"], True)):
        args = build_parser().parse_args(["serve", *flag])
        flags = server_args(model, config, discover_blend=args.discover_blend)
        extra = vllm_server_parser().parse_args(flags).kv_transfer_config.kv_connector_extra_config
        assert extra.get("discover_blend") is expected


def test_serve_sizes_the_kv_space_as_the_pipeline_does(tmp_path, model):
    from kvblend.rag.engine import engine_kwargs
    from kvblend.server import server_args, vllm_server_parser

    config = PipelineConfig(store_dir=tmp_path / "store")
    spec = spec_from_config(model_config(model), config.dtype)
    parse = vllm_server_parser().parse_args
    default = parse(server_args(model, config))
    assert default.kv_cache_memory_bytes == kv_space_bytes(spec, 4096, 4) == engine_kwargs(model, config)[
        "kv_cache_memory_bytes"], "the KV space RAGPipeline gives its engine (DEFAULT_ENGINE_ARGS)"
    smaller = parse(server_args(model, config, vllm_args=["--max-model-len", "2048", "--max-num-seqs", "2"]))
    assert smaller.kv_cache_memory_bytes == kv_space_bytes(spec, 2048, 2), "sized for the vLLM flags in effect"
    own = parse(server_args(model, config, vllm_args=["--gpu-memory-utilization", "0.5"]))
    assert own.kv_cache_memory_bytes is None and own.gpu_memory_utilization == 0.5, "vLLM's flags size it"


def test_print_command_in_a_fresh_home_converts_nothing_and_names_the_redis_variable(tmp_path, monkeypatch, capsys,
                                                                                     redis_url):
    from kvblend.cli import main

    monkeypatch.setenv("KVBLEND_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM"):  # main sets them where unset
        monkeypatch.setenv(name, "ERROR" if name == "VLLM_LOGGING_LEVEL" else "ext://sys.stderr")
    assert main(["serve", "--print-command", "--redis", redis_url]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{ENGINE_REDIS_URL_ENV}={redis_url} ") and "--kv-cache-memory-bytes" in out
    assert f'"redis_url_env": "{ENGINE_REDIS_URL_ENV}"' in out and out.count(redis_url) == 1
    assert str(tmp_path / "cache" / "models") in out and "not converted yet" in err
    for help_argv in (["--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(help_argv)
        assert done.value.code == 0
    assert not (tmp_path / "cache" / "models").exists(), "the embedded model was converted"


def test_print_command_hides_a_redis_password():
    from kvblend.server import plain_vllm_command

    command = plain_vllm_command(["--port", "1"], {ENGINE_REDIS_URL_ENV: "redis://user:hunter2-s3cret@h:6379/0"})
    assert command.startswith(f"{ENGINE_REDIS_URL_ENV}='redis://user:***@h:6379/0' ") and "hunter2" not in command


def test_serve_refuses_a_kv_space_the_machine_cannot_hold_before_vllm_starts(model_dir, tmp_path, monkeypatch,
                                                                              capsys):
    from vllm.platforms import current_platform

    from kvblend.cli import EXIT_FAILURE, main

    if not current_platform.is_cpu():
        pytest.skip("the check before start is for CPU engines (on GPU, vLLM sizes against the device)")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    for name in ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM"):
        monkeypatch.setenv(name, "ERROR" if name == "VLLM_LOGGING_LEVEL" else "ext://sys.stderr")
    argv = ["serve", "--model", str(model_dir), "--store", str(tmp_path / "store"), "--", "--max-num-seqs", "4096"]
    assert main(argv) == EXIT_FAILURE  # 4096 sequences of 4096 tokens: hundreds of GiB of KV space
    err = capsys.readouterr().err
    assert "max_num_seqs 4096" in err and "lower max_model_len or max_num_seqs" in err, err


def test_the_gguf_header_gives_the_converted_models_config(model_dir):
    """What `--print-command` sizes the KV space from before the embedded model is converted."""
    import json

    from kvblend.model.embedded import gguf_config, gguf_path

    header, converted = gguf_config(gguf_path()), json.loads((model_dir / "config.json").read_text())
    assert header and header == pytest.approx({name: converted[name] for name in header})
    assert spec_from_config(header, "float32").num_kv_heads == spec_from_config(converted, "float32").num_kv_heads
