"""Writes docs/configuration.md from the settings' owners (the config dataclasses, the request parameters'
docstring, the command line's parser), so the reference never states a default of its own.

`python -m kvblend.docs_config` rewrites the page; `--check` exits 1 when it differs (tests/test_docs_config.py)."""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import sys
from dataclasses import MISSING, Field, fields
from pathlib import Path
from unittest import mock

from kvblend.blend.config import BlendConfig
from kvblend.rag.config import DEFAULT_SAMPLING, PipelineConfig
from kvblend.store.entry import SECRET_ENV
from kvblend.store.key import TENANT_SECRET_ENV
from kvblend.store.tiered import StoreConfig
from kvblend.vllm import params
from kvblend.vllm.config import ENGINE_REDIS_URL_ENV, ConnectorConfig

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
LITERALS = (ast.Constant, ast.Tuple, ast.List, ast.Dict, ast.UnaryOp)

CONNECTOR = {
    "mode": '`"blend"`: CacheBlend of cached chunks found anywhere in the prompt, plus storage, for requests that '
            'carry kvblend parameters; `"storage"`: exact reuse of prefix-chained spans only',
    "store_dir": "disk tier directory (None: `~/.cache/kvblend/store`)",
    "disk_gb": "disk tier budget, GiB",
    "memory_gb": "memory tier budget per process, GiB (under tensor parallelism each rank holds `memory_gb / ranks`)",
    "redis_url": "Redis tier URL, `redis://` or `redis+cluster://` ([storage](storage.md#redis-cluster-and-valkey))",
    "redis_url_env": "the name of an environment variable holding the Redis URL: vLLM logs "
                     "`kv_connector_extra_config` at start, so give a URL with a password this way",
    "redis_timeout_s": "a Redis command slower than this is a miss (reads) or a failed put",
    "directory_url": "the peer directory's Redis URL ([multiple instances](multi-instance.md))",
    "redis_gb": "Redis tier budget, GiB, kept on the server and shared by every writer",
    "redis_ttl_s": "also expire Redis entries unused this long (None: never)",
    "disk": "false: no disk tier",
    "codecs": 'storage codec per tier over StoreConfig\'s, e.g. `{"redis": "fp8", "disk": "int6"}` '
              "([codecs](storage.md#storage-codecs))",
    "namespace": "the chunk keys' namespace, a plain name ([tenants](security.md#tenants))",
    "require_tenant": "requests without a tenant secret neither read nor write the store",
    "span_tokens": "tokens per prefix-chained span (storage mode's unit of exact reuse)",
    "extract": "store the KV of prompts vLLM prefills itself",
    "discover": "a request that asks to blend without naming its chunks gets the cached chunks found in its prompt "
                "by content hash",
    "discover_blend": "blend requests that carry no kvblend parameters too "
                      "([exact unless asked](blending.md#exact-unless-asked))",
    "min_chunk_tokens": "the shortest cached chunk discovery looks for in a prompt",
    "policy": "blend policy: `cacheblend`, `epic`, `full_reuse`, `full_prefill`, `random` (BlendConfig)",
    "ratio": "the share of chunk tokens recomputed",
    "check_layers": "the layers where the selection measures deviation (None: BlendConfig's)",
    "gate_bound": "the quality gate: above it a request becomes a full prefill (None: off; "
                  "[quality gate](blending.md#quality-gate))",
    "gate_raise": "opt-in: above it a request's ratio is doubled (None: off)",
    "self_check": "check at start that the blend reproduces vLLM's KV; blending stays off until it passes",
    "cpu_ops": '`"vllm"`: on a CPU engine the chunks\' rope shift runs on vLLM\'s C++ rotary kernel, after '
               'checking it against kvblend\'s torch reference at start; `"torch"`: on the reference',
    "blend_attention": '`"auto"`: a blend\'s active rows attend with kvblend\'s sparse-query kernel on a GPU (vLLM\'s '
                       'backend would run each scattered row as its own sequence) and with vLLM\'s backend on a CPU; '
                       '`"vllm"` or `"kvblend"` to choose',
    "blend_cuda_graphs": "where vLLM runs CUDA graphs (not enforce_eager), a blend's layers after its last check "
                         "layer replay as CUDA graphs too (one GPU, kvblend's attention)",
    "prefetch": "the worker moves a step's stored KV whole into the memory tier in the background before its "
                "layer reads",
    "controller": "the loading controller picks each blended request's tier and ratio, and leaves a storage-mode "
                  "load to vLLM where reading it costs more than recomputing it ([storage](storage.md#loading-controller))",
}
PIPELINE = {
    "model_dir": "HF model directory (None: the embedded SmolLM2)",
    "index_dir": "vector index directory (None: `~/.cache/kvblend/index`)",
    "store_dir": "disk tier directory (None: `~/.cache/kvblend/store`)",
    "redis_url": "Redis tier URL; reaches the engine through `KVBLEND_ENGINE_REDIS_URL`, never vLLM's logged config",
    "memory_gb": "memory tier budget per process, GiB",
    "disk_gb": "disk tier budget, GiB",
    "redis_gb": "Redis tier budget, GiB",
    "redis_ttl_s": "expire Redis entries unused this long (None: never)",
    "policy": "blend policy",
    "ratio": "recompute ratio",
    "gate_bound": "the quality gate's fallback bound (None: off)",
    "gate_raise": "the quality gate's opt-in raise bound (None: off)",
    "top_k": "chunks retrieved per question",
    "chunk_tokens": "tokens per chunk when documents are added",
    "namespace": "the chunk keys' namespace",
    "tenant_secret": "keeps this pipeline's chunk KV in its tenant's own namespace",
    "system_prompt": "the system turn of every prompt",
    "separator": "what follows each document in the prompt",
    "max_tokens": "tokens generated per answer",
    "sampling": "SamplingParams fields every query starts from (a query's own keywords win)",
    "engine_args": "merged over `DEFAULT_ENGINE_ARGS` and passed to `vllm.LLM` (not `model`, `kv_transfer_config`, "
                   "`load_format`)",
}
ENVIRONMENT = {
    SECRET_ENV: "the deployment secret (16+ bytes): entries carry a keyed MAC ([security](security.md#authentication))",
    TENANT_SECRET_ENV: "the tenant secret of `RAGPipeline` and the command line ([security](security.md#tenants))",
    ENGINE_REDIS_URL_ENV: "the Redis URL `RAGPipeline` and `kvblend serve --redis` hand the engine (its "
                          "`redis_url_env`)",
    "KVBLEND_REDIS_URL": "the default of `--redis` on the command line and `make demo`",
    "KVBLEND_CACHE_DIR": "the cache root (models, index, store); default `$XDG_CACHE_HOME/kvblend` or "
                         "`~/.cache/kvblend`",
}


def default_sources(cls: type) -> dict[str, ast.expr]:
    """Each field's default expression as written in the class body."""
    body = ast.parse(inspect.getsource(cls)).body[0]
    return {node.target.id: node.value for node in body.body
            if isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name)}


def factory_source(call: ast.expr) -> str:
    """What a `field(default_factory=...)` makes, as source: a lambda's body, or a call of the factory."""
    for keyword in getattr(call, "keywords", []):
        if keyword.arg == "default_factory":
            made = keyword.value
            return ast.unparse(made.body) if isinstance(made, ast.Lambda) else f"{ast.unparse(made)}()"
    return ast.unparse(call)


def render_default(f: Field, source: ast.expr | None) -> str:
    """The default as a value, with the owner's name where the class refers to one; factories as written."""
    if f.default is MISSING:
        return f"`{factory_source(source)}`" if source is not None else ""
    value = repr(f.default)
    if source is None or isinstance(source, LITERALS):
        return f"`{value}`"
    return f"`{value}` (`{ast.unparse(source)}`)" if len(value) <= 40 else f"`{ast.unparse(source)}`"


def cell(text: str) -> str:
    """Text fit for one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def dataclass_table(cls: type, descriptions: dict[str, str] | None = None) -> str:
    """One row per field: name, type, default, and its description when given."""
    sources = default_sources(cls)
    head = "| setting | type | default |" + (" what |" if descriptions else "")
    rows = [head, "|---|---|---|" + ("---|" if descriptions else "")]
    for f in fields(cls):
        row = f"| `{f.name}` | `{cell(str(f.type))}` | {cell(render_default(f, sources.get(f.name)))} |"
        rows.append(row + (f" {cell(descriptions[f.name])} |" if descriptions else ""))
    return "\n".join(rows)


def docstring(obj: object) -> str:
    """An object's docstring, dedented: the owner's own words about its settings."""
    return inspect.cleandoc(obj.__doc__ or "")


def subcommands(parser: argparse.ArgumentParser, prefix: str = "kvblend") -> list[tuple[str, argparse.ArgumentParser]]:
    """(command line, parser) of every leaf subcommand, in the parser's order."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += subcommands(sub, f"{prefix} {name}")
    return found or [(prefix, parser)]


def flag_table(parser: argparse.ArgumentParser) -> str:
    """One row per flag or positional argument: name, default (when it has one), help."""
    rows = ["| flag | default | what |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(action.option_strings) or action.dest
        unset = action.default is None or action.default == argparse.SUPPRESS or action.nargs == 0
        default = "" if unset else f"`{action.default}`"
        rows.append(f"| `{name}` | {cell(default)} | {cell(action.help or '')} |")
    return "\n".join(rows)


def command_line() -> list[str]:
    """A section per subcommand, its parser built with no KVBLEND_* variable set (defaults never read the
    generating machine's environment)."""
    from kvblend.cli import build_parser

    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVBLEND_")}
    with mock.patch.dict(os.environ, clean, clear=True):
        parser = build_parser()
    return [f"### `{name}`\n\n{flag_table(sub)}\n" for name, sub in subcommands(parser)]


def page() -> str:
    """The whole of docs/configuration.md."""
    env = "\n".join(f"| `{name}` | {cell(what)} |" for name, what in ENVIRONMENT.items())
    parts = [
        "# Configuration reference",
        "",
        ("<!-- Generated by `python -m kvblend.docs_config` from the settings' owners; edit those, not this page "
         "(tests/test_docs_config.py fails when it differs). -->"),
        "",
        ("Every default has one owner and this page is written from them: `BlendConfig` (policy, ratio, check "
         "layers, quality gate), `StoreConfig` (budgets, store directory, codecs, tiers), `ChunkKey` (namespace), "
         "`cpu_compute_dtype` (the CPU engine's dtype); `PipelineConfig`, `ConnectorConfig` and the command line "
         "refer to them. Values are Python's; in JSON (`--kv-transfer-config`) `None` is `null`, `True` `true`."),
        "",
        "## The connector: `kv_connector_extra_config`",
        "",
        ("`kvblend.vllm.config.ConnectorConfig`; all optional, unknown keys are refused. What the connector does "
         "with them: [connector.md](connector.md), [blending.md](blending.md), [storage.md](storage.md)."),
        "",
        dataclass_table(ConnectorConfig, CONNECTOR),
        "",
        "## Per request: `kv_transfer_params[\"kvblend\"]`",
        "",
        ("`kvblend.vllm.params` (in `SamplingParams(extra_args={\"kv_transfer_params\": ...})`, or the "
         "`kv_transfer_params` field of an OpenAI request to `kvblend serve`):"),
        "",
        "```",
        docstring(params),
        "```",
        "",
        "## The pipeline: `RAGPipeline(...)`",
        "",
        "`kvblend.rag.config.PipelineConfig`, validated before any engine starts.",
        "",
        "```",
        docstring(PipelineConfig),
        "```",
        "",
        dataclass_table(PipelineConfig, PIPELINE),
        "",
        "`DEFAULT_ENGINE_ARGS` (`kvblend.rag.config`), what `engine_args` are merged over:",
        "",
        "```",
        assignment_source("DEFAULT_ENGINE_ARGS"),
        "```",
        "",
        f"`DEFAULT_SAMPLING`: `{DEFAULT_SAMPLING!r}`.",
        "",
        "## The store: `StoreConfig`",
        "",
        ("`kvblend.store.tiered.StoreConfig`; `StoreConfig.from_settings` builds it from the GiB budgets the "
         "pipeline, the connector and the command line take."),
        "",
        "```",
        docstring(StoreConfig),
        "```",
        "",
        dataclass_table(StoreConfig),
        "",
        "## The blend: `BlendConfig`",
        "",
        "`kvblend.blend.config.BlendConfig`.",
        "",
        "```",
        docstring(BlendConfig),
        "```",
        "",
        dataclass_table(BlendConfig),
        "",
        "## Environment",
        "",
        "| variable | what |",
        "|---|---|",
        env,
        "",
        "## Command line",
        "",
        "Options the user leaves out take their owner's default (the tables above).",
        "",
        *command_line(),
    ]
    return "\n".join(parts).rstrip() + "\n"


def assignment_source(name: str) -> str:
    """The statement assigning `name` in kvblend.rag.config, as written (its values may depend on the machine)."""
    import kvblend.rag.config as module

    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return ast.unparse(node)
    raise LookupError(f"{name} is not assigned in kvblend.rag.config")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md differs")
    args = parser.parse_args(argv)
    text = page()
    if args.check:
        same = PAGE.exists() and PAGE.read_text(encoding="utf-8") == text
        if not same:
            print(f"{PAGE} differs from what `python -m kvblend.docs_config` writes", file=sys.stderr)
        return 0 if same else 1
    PAGE.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
