"""A minimal router for disaggregated prefill: each OpenAI request goes first to the prefill instance (kvblend
blends there, with max_tokens=1 and NixlConnector's `do_remote_decode`), then, with the `kv_transfer_params`
the prefill returned, to the decode instance, which pulls the prompt's KV over NIXL and generates. vLLM's
installed package ships no such router (its toy proxy lives in vLLM's source tree, under tests/); this one
follows the same protocol.

    python examples/pd_proxy.py --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000

kvblend's report of the prefill (what was blended) comes back in the response's
`kv_transfer_params["kvblend"]`, or with `stream: true` in the `kvblend-report` header (JSON).
"""

from __future__ import annotations

import argparse
import json

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvblend.vllm.disagg import REMOTE_DECODE, decode_params


def prefill_body(body: dict) -> dict:
    """The request as the prefill instance gets it: one token, not streamed, NixlConnector told to hand off."""
    kvblend = (body.get("kv_transfer_params") or {}).get("kvblend")
    params = {**REMOTE_DECODE, **({"kvblend": kvblend} if kvblend is not None else {})}
    out = {**body, "kv_transfer_params": params, "max_tokens": 1, "stream": False}
    out.pop("stream_options", None)
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


def build_app(prefill_url: str, decode_url: str) -> FastAPI:
    app = FastAPI(title="kvblend P/D proxy")
    client = httpx.AsyncClient(timeout=None)

    async def route(path: str, request: Request) -> Response:
        body = await request.json()
        first = await client.post(prefill_url + path, json=prefill_body(body))
        if first.status_code != 200:
            return Response(first.content, status_code=first.status_code, media_type="application/json")
        handed = first.json().get("kv_transfer_params")
        report = (handed or {}).get("kvblend")
        second = {**body, "kv_transfer_params": decode_params(handed)}
        if body.get("stream"):
            async def relay():
                async with client.stream("POST", decode_url + path, json=second) as answer:
                    async for chunk in answer.aiter_raw():
                        yield chunk

            headers = {"kvblend-report": json.dumps(report)} if report is not None else {}
            return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)
        answer = await client.post(decode_url + path, json=second)
        out = answer.json()
        if answer.status_code == 200 and report is not None:
            out["kv_transfer_params"] = {**(out.get("kv_transfer_params") or {}), "kvblend": report}
        return JSONResponse(out, status_code=answer.status_code)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await route("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await route("/v1/chat/completions", request)

    @app.get("/v1/models")
    async def models() -> Response:
        answer = await client.get(decode_url + "/v1/models")
        return Response(answer.content, status_code=answer.status_code, media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", required=True, help="base URL of the prefill instance (no /v1)")
    parser.add_argument("--decode", required=True, help="base URL of the decode instance (no /v1)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(build_app(args.prefill.rstrip("/"), args.decode.rstrip("/")), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
