"""Why a request that carried kvblend parameters reused nothing: the `reason` of its `kvblend` report.

The report is `RequestOutput.kv_transfer_params["kvblend"]` (in an OpenAI response: `kv_transfer_params`); every
request that carried the "kvblend" key gets one, but for one that asked for mode "off" (kvblend stays out of it). `reason` (a code of REASONS) and `detail` (its sentence) are there
exactly when nothing stored was reused.
"""

from __future__ import annotations

REASONS = {
    "bad_params": "its kvblend parameters are invalid (the server log says why); it ran as plain vLLM",
    "tenant_required": "this server requires a tenant_secret to use the store",
    "store_prompt": "store_prompt: vLLM computes the prompt and the connector stores it",
    "short_prompt": "the prompt is shorter than 2 tokens",
    "blend_off": "blending is off on this server (blend_off says why) and no stored prefix matched",
    "blend_not_ready": "the connector's self-check has not run yet (it runs on the first plain prompt)",
    "not_located": "none of the named documents occurs in the prompt's token ids (a text tokenized differently in "
                   "context?); store and send the documents as the prompt holds them",
    "not_found": "no stored chunk was found in the prompt by content hash",
    "not_stored": "what the prompt holds is not in the store under this request's namespace: store it first",
    "tenant": "the chunks are stored in the shared namespace, not in this tenant's: store them with its tenant_secret",
    "prefix_cached": "vLLM's own prefix cache already held the reusable part of the prompt",
    "gate": "the quality gate sent the request to a full prefill (gate says why)",
    "controller": "the loading controller measured recomputing the stored chunks or prefix as faster than loading "
                  "them (controller says why)",
    "error": "loading or blending the stored KV failed (load_error or blend_error says why); vLLM recomputed it",
}


def nothing_reused(report: dict, reason: str) -> dict:
    """`report` with the reason nothing was reused (a code of REASONS) and its sentence."""
    report.update(reason=reason, detail=REASONS[reason])
    return report
