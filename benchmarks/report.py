"""The current figure per question, regenerated from the result files: the headline tables of benchmarks/RESULTS.md
and the README's "Measured" block, each between `<!-- results:start -->` and `<!-- results:end -->`.

    python -m benchmarks.report            # rewrite both blocks from benchmarks/results/
    python -m benchmarks.report --check    # exit 1 if either block differs from what the files give

Every number in a generated table is read from a file in benchmarks/results/ (the latest result per suite and
device; older ones are in git history, their notes in benchmarks/HISTORY.md). Result files of earlier rounds have
their own layouts: each question reads its file through a small adapter; what a file does not record (a date, a
sha) is shown as such, never filled in.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import REPO, RESULTS

START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
README = REPO / "README.md"
CODECS = ("full", "fp8", "int6", "int4")


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def provenance(data: dict) -> dict[str, str]:
    """Command, device, date and sha as the file records them (layouts of every round)."""
    machine = data.get("machine") or {}
    cpu = machine.get("cpu") if "cpu" in machine else machine or data.get("cpu")
    device = data.get("device") or data.get("gpu")
    if isinstance(device, list):
        device = ", ".join(d.get("name", "?") for d in device)
    if isinstance(device, dict):
        device = device.get("model")
    if isinstance(cpu, str):
        device = device or ", ".join([cpu, *([f"{data['cpus']} cores"] if "cpus" in data else [])])
    if not device and machine.get("gpu"):
        device = ", ".join(g["name"] for g in machine["gpu"])
    if not device and isinstance(cpu, dict):
        device = f"{cpu.get('model', '?')}, {cpu.get('cores', '?')} cores"
    sha = data.get("git_sha") or data.get("sha") or ", ".join(data.get("git_shas") or [])
    return {"command": data.get("command") or "command not recorded", "device": device or "device not recorded",
            "date": data.get("date") or "date not recorded", "sha": f"sha {sha}" if sha else "sha not recorded"}


def ms(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def times(x: float) -> str:
    return f"{x:.2f}x"


def pct(x: float) -> str:
    return f"{x:.0%}"


def by_mode(data: dict, field: str) -> dict[str, float]:
    """`field` of each row of a TTFT result, by the row's mode (in the file's order)."""
    return {r["mode"]: r[field] for r in data["rows"]}


@dataclass(frozen=True)
class Table:
    """One question's current answer: its table and a line for the README, read from `source`."""

    question: str
    sources: tuple[str, ...]  # the result files read, in benchmarks/results/
    header: list[str]
    rows: list[list[str]]
    headline: str


# -- adapters: one per question, each reading the latest file(s) of its suite -------------------------------------
def fidelity() -> Table:
    data = load("quality_fidelity_cpu.json")
    rows, at = [], {}
    for s in data["settings"]:
        if s["ratio"] == 0.15 and s["policy"] != "full_prefill":
            rows.append([s["context"], s["policy"], f"{s['ratio']:g}", pct(s["gap_closed"]), f"{s['kl_mean']:.3f}",
                         pct(s["compute_fraction"])])
            at[(s["context"], s["policy"])] = s
    ours, published = at[("alone", "cacheblend")], at[("alone", "cacheblend_published")]
    headline = (f"Fidelity ({data['model'].split('-b')[0]}, {data['dtype']}, {data['cases']} cases): the default "
                f"selection at r = 0.15 closes {pct(ours['gap_closed'])} of the KL gap between reusing the chunks' KV "
                f"as is and a full prefill, at {pct(ours['compute_fraction'])} of a full prefill's token-layers; the "
                f"published CacheBlend selection {pct(published['gap_closed'])}.")
    return Table("How much of the KL gap to a full prefill does the blend close? (quality fidelity)",
                 ("quality_fidelity_cpu.json",),
                 ["context", "policy", "ratio", "KL gap closed", "mean KL", "compute"], rows, headline)


def codec_fidelity() -> Table:
    rows = []
    for codec in CODECS:
        data = load(f"quality_fidelity_codec_{codec}_cpu.json")
        for s in data["settings"]:
            if s["policy"] != "full_prefill":
                rows.append([codec, s["policy"], f"{s['ratio']:g}", pct(s["gap_closed"]), f"{s['kl_mean']:.4f}",
                             f"{s['task_em']:.3f}"])
    return Table("What does each storage codec cost in fidelity? (quality fidelity --codec)",
                 tuple(f"quality_fidelity_codec_{codec}_cpu.json" for codec in CODECS),
                 ["codec", "policy", "ratio", "KL gap closed", "mean KL", "task exact match"], rows, "")


def gate() -> Table:
    rows = []
    for name, label in (("quality_gate_cpu.json", "calibration"), ("quality_gate_heldout_cpu.json", "held out")):
        data = load(name)
        for r in data.get("rows") or data["replay"]:
            rows.append([label, str(data["cases"]), r["signal"], f"{r['bound']:.4g}", pct(r["raised"]),
                         f"{r['kl_mean']:.4f}", f"{r['fixed_kl_same_compute']:.4f}", pct(r["compute"])])
    return Table("Does the quality gate's signal beat a fixed ratio at the same compute? (quality gate)",
                 ("quality_gate_cpu.json", "quality_gate_heldout_cpu.json"),
                 ["cases", "n", "signal", "bound", "raised", "mean KL gated", "fixed ratio, same compute", "compute"],
                 rows, "")


def rag_ttft_cpu() -> Table:
    data = load("vllm_cpu_rag_ttft_cpu.json")
    by = by_mode(data, "speedup_vs_vllm")
    rows = [[mode, ms(ttft), times(by[mode])] for mode, ttft in by_mode(data, "ttft_ms_median").items()]
    headline = (f"Inside vLLM on a CPU ({provenance(data)['device']}; 6 chunks x 512 tokens + question, chunks seen "
                f"before in other orders): TTFT {times(by['kvblend_blend'])} and "
                f"{times(by['kvblend_blend_torch_ops'])} lower than plain vLLM with prefix caching (blend on vLLM's "
                f"rotary kernel, and on kvblend's torch rope shift); storage mode {times(by['kvblend_storage'])}.")
    return Table("RAG TTFT inside vLLM on the CPU: blend vs storage mode vs plain vLLM (vllm_cpu rag_ttft)",
                 ("vllm_cpu_rag_ttft_cpu.json",), ["mode", "median TTFT ms", "vs plain vLLM"], rows, headline)


def server_ttft() -> Table:
    data = load("vllm_cpu_server_cpu.json")
    by = by_mode(data, "speedup_vs_chat_plain")
    rows = [[mode, ms(ttft), times(by[mode]), data["found"][mode]]
            for mode, ttft in by_mode(data, "ttft_ms_median").items()]
    headline = (f"Through `kvblend serve` with the openai client, documents sent as text: median TTFT "
                f"{times(by['chat_named'])} lower than plain vLLM on the same server "
                f"({data['found']['chat_named']}; discovered by content hash {times(by['chat_discovered'])}, "
                f"as token ids {times(by['ids_named'])}).")
    return Table("Documents sent as text through `kvblend serve`: found, and TTFT (vllm_cpu server)",
                 ("vllm_cpu_server_cpu.json",), ["request", "median TTFT ms", "vs chat_plain", "documents"], rows,
                 headline)


def index_throughput() -> Table:
    data = load("vllm_cpu_index_cpu.json")
    rows = [[r["run"], f"{r['seconds']:.1f}", f"{r['chunks_per_s']:.2f}", f"{r['tokens_per_s']:.0f}"]
            for r in data["rows"]]
    return Table("Indexing: RAGPipeline.precompute vs the engine's own prefill (vllm_cpu index)",
                 ("vllm_cpu_index_cpu.json",), ["run", "s", "chunks/s", "tokens/s"], rows, "")


def prefetch_vllm() -> Table:
    data = load("vllm_cpu_prefetch_cpu.json")
    rows = [[r["store"], r["prefetch"], ms(r["ttft_ms_median"])] for r in data["rows"]]
    return Table("Prefetch inside vLLM: TTFT with the chunks only on disk or in Redis (vllm_cpu prefetch)",
                 ("vllm_cpu_prefetch_cpu.json",), ["store", "prefetch", "median TTFT ms"], rows, "")


def workloads() -> Table:
    data = load("workloads_cpu.json")
    phases = ("chat", "document_qa_first", "document_qa_repeat", "after_restart", "after_restart_redis_only")
    rows = []
    for name, system in data["systems"].items():
        if "start_error" in system:
            rows.append([name, "did not start: " + system["start_error"].split(":")[0]] + [""] * len(phases))
            continue
        cells = [f"{ms(system[p]['ttft_ms_p50'])} ({pct(system[p]['hit_rate'])})" if p in system else "-"
                 for p in phases]
        rows.append([name, "", *cells])
    return Table("Multi-turn chat and long-document QA: storage mode vs vLLM's prefix cache and offloading (workloads)",
                 ("workloads_cpu.json",), ["system", "note", *(f"{p} p50 ms (hit rate)" for p in phases)], rows, "")


def gpu_blend() -> list[Table]:
    tables = []
    for path in sorted(RESULTS.glob("gpu_blend_*.json")):
        data = json.loads(path.read_text())
        rows, ratio = [], {}
        for tokens in sorted({r["tokens"] for r in data["rows"]}):
            at = {(r["row"], r["kv_source"]): r["ttft_ms"] for r in data["rows"] if r["tokens"] == tokens}
            hf, pinned = at[("hf_full_prefill", None)], at[("cacheblend", "cpu_pinned")]
            ratio[tokens] = hf / pinned
            rows.append([str(tokens), ms(hf), ms(at[("kvblend_full_prefill", None)]), ms(at[("cacheblend", "gpu")]),
                         ms(pinned), times(hf / pinned)])
        sparse = [a for a in data.get("attention", []) if a.get("status") == "ok" and "sparse" in a["kernel"]]
        best = max(sparse, key=lambda a: a["achieved"]) if sparse else None
        attention = (f"; the sparse-query attention at {pct(best['achieved'] / best['ceiling'])} of the run's bf16 "
                     f"matmul ceiling ({'Gluon' if best.get('gluon') else 'Triton'} kernel)" if best else "")
        headline = (f"{data['device']}, kvblend's standalone torch runner (not inside vLLM; the served path is the "
                    f"vllm_gpu_rag line), Llama-3-8B shape, cacheblend r = 0.15 with chunk KV from pinned host memory "
                    f"against HF transformers in the same run: "
                    + ", ".join(f"{times(v)} at {k} tokens" for k, v in ratio.items()) + attention + ".")
        tables.append(Table(f"GPU blend vs HF transformers, {data['device']} (gpu_blend)", (path.name,),
                            ["tokens", "HF full prefill ms", "kvblend full prefill ms", "cacheblend, KV on GPU ms",
                             "cacheblend, KV pinned host ms", "pinned vs HF"], rows, headline))
    return tables


def store_tiers() -> Table:
    data = load("store_tiers_cpu.json")
    rows = [[r["chunk"], r["op"], r["impl"], f"{r['ms']:.2f}", f"{r['gbps']:.2f}" if r.get("copies", True) else
             "no copy"] for r in data.get("rows") or data["results"]]
    return Table("Chunk KV store throughput per tier, beside plain copies, files and sockets (store tiers)",
                 ("store_tiers_cpu.json",), ["chunk", "op", "tier or reference", "ms (median)", "GB/s"], rows, "")


def store_codecs() -> Table:
    data = load("store_codecs_cpu.json")
    rows = [[r["chunk"], r["codec"], f"{r['entry_bytes'] / 2**20:.2f}", times(r["chunks_per_gb_vs_full"]),
             ms(r["disk_get_ms"]), ms(r["redis_get_ms"])] for r in data["rows"]]
    return Table("Storage codecs: bytes per entry and get time (store codecs)", ("store_codecs_cpu.json",),
                 ["chunk", "codec", "entry MiB", "chunks per GB vs full", "disk get ms", "redis get ms"], rows, "")


def store_cluster() -> Table:
    data = load("store_cluster_cpu.json")
    rows = [[label, f"{got['put']['ops_per_s']:.1f}", f"{got['get']['ops_per_s']:.1f}",
             f"{got['get']['MB_per_s']:.0f}"] for label, got in data["throughput"].items()]
    kill = data["shard_kill"]
    rows.append(["shard killed mid-run", f"errors seen by requests: {kill['errors_seen_by_requests']}",
                 f"served {kill['served']} of {kill['requests']}",
                 f"dead shard served again after {kill['dead_shard_served_again_after_s']:.1f} s"])
    return Table("Redis Cluster vs one server; a shard killed mid-run (store cluster)", ("store_cluster_cpu.json",),
                 ["run", "put ops/s", "get ops/s", "get MB/s"], rows, "")


def store_prefetch() -> Table:
    data = load("store_prefetch_cpu.json")
    rows = [[r["tier"], r["state"], r["mode"], f"{r['gap_ms']:g}" if r["mode"] == "retrieval" else "-",
             f"{r['ms']:.2f}"] for r in data["rows"]]
    return Table("Prefetch at the store: KV loading on a blended request's critical path (store prefetch)",
                 ("store_prefetch_cpu.json",), ["store", "page cache", "prefetch", "gap ms", "loading ms (median)"],
                 rows, "")


def pd_ttft() -> Table:
    data = load("transport_pd_cpu.json")
    rows = [[r["mode"], ms(r["ttft_ms_median"]), times(r["speedup_vs_one_plain"])] for r in data["rows"]]
    return Table("Disaggregated prefill (1 prefill + 1 decode) vs one instance, plain and blended (transport pd)",
                 ("transport_pd_cpu.json",), ["mode", "median TTFT ms", "vs one instance, plain"], rows, "")


def peer() -> Table:
    data = load("transport_peer_cpu.json")
    rows = [[r["chunk"], r["impl"], ms(r["ms"]), f"{r['gbps']:.2f}"] for r in data.get("rows") or data["results"]]
    return Table("One chunk from another instance: NIXL peer fetch vs Redis vs disk vs recompute (transport peer)",
                 ("transport_peer_cpu.json",), ["chunk", "source", "ms (median)", "GB/s of K+V"], rows, "")


def nixl_gpu() -> list[Table]:
    tables = []
    for path in sorted(RESULTS.glob("transport_nixl_gpu_*.json")):
        data = json.loads(path.read_text())
        rows = [[str(r["mib"]), f"{r['ms']:.2f}", f"{r['gbps']:.2f}", r["backend"]] for r in data["rows"]]
        tables.append(Table(f"GPU memory between two processes through NIXL, {data['gpu']} (transport nixl_gpu)",
                            (path.name,), ["MiB", "ms (median)", "GB/s", "backend"], rows, ""))
    return tables


def served_as(row: dict) -> str:
    """How the row's requests were served, from the connector's reports: 'blend 7/7', 'none 7/7 (blend_off)'; empty
    where no request has a report (plain vLLM)."""
    reports = row.get("reports") or []
    modes = Counter(r["mode"] for r in reports if "mode" in r)
    if not modes:
        return ""
    reasons = sorted({r["reason"] for r in reports if r.get("reason")})
    return ", ".join(f"{m} {n}/{len(reports)}" for m, n in modes.items()) + (f" ({', '.join(reasons)})" if reasons else "")


def gpu_rag_targets(data: dict) -> list[list[str]]:
    """Issue 27's targets, each met, missed (by how much) or not measured (and why), from one vllm_gpu_rag file."""
    rows, systems = data["rows"], data.get("systems", {})
    notes = {**{k: v.get("error", "") for k, v in systems.items()}, **data.get("annotations", {})}

    def find(mode: str, scenario: str, chunks: int | None = None) -> dict | None:
        return next((r for r in rows if r["mode"] == mode and r["scenario"] == scenario
                     and (chunks is None or r.get("chunks") == chunks)), None)

    out = []
    for chunks, goal in ((6, 3.0), (16, 4.0), (63, 4.0)):
        r = find("kvblend_blend", "rag", chunks)
        if r is None or r["speedup_vs_vllm"] is None:
            out.append([f"blend TTFT >= {goal:.0f}x lower than plain vLLM, {chunks} chunks", "not measured",
                        notes.get("kvblend", "")])
            continue
        blended = sum(rep.get("mode") == "blend" for rep in r.get("reports", []))
        verdict = "met" if r["speedup_vs_vllm"] >= goal and blended else "missed"
        out.append([f"blend TTFT >= {goal:.0f}x lower than plain vLLM, {r['tokens']} tokens", verdict,
                    f"{times(r['speedup_vs_vllm'])}; {blended}/{r['n']} requests blended"])
    lm = [r for r in rows if r["mode"] == "lmcache_blend"]
    out.append(["faster than LMCache's CacheBlend at r = 0.15, at least its fidelity",
                "measured" if lm else "not measured", "" if lm else notes.get("lmcache_blend", "")])
    plain = find("vllm_prefix_caching", "doc_evicted")
    storage_targets = (("doc_evicted", "vllm_offloading", "storage mode within 10% of OffloadingConnector where both hit"),
                       ("doc_after_restart", "kvblend_restart",
                        "storage mode ahead of OffloadingConnector after a restart (page cache dropped, as after a reboot)"),
                       ("doc_after_restart_page_cache", "kvblend_restart",
                        "storage mode ahead of OffloadingConnector after an engine restart (page cache kept)"))
    for scenario, system, what in storage_targets:
        mine, theirs = find("kvblend_storage", scenario), find("vllm_offloading", scenario)
        if mine is None or theirs is None:
            have = (f"kvblend {ms(mine['ttft_ms_median'])} ms, plain vLLM's recompute {ms(plain['ttft_ms_median'])} "
                    f"ms; " if mine is not None and plain is not None else "")
            out.append([what, "not measured", have + notes.get(system, "")])
            continue
        a, b = mine["wall_ms_median"], theirs["wall_ms_median"]
        met = a <= 1.1 * b if scenario == "doc_evicted" else a < b
        out.append([what, "met" if met else "missed",
                    f"{ms(a)} vs {ms(b)} ms wall time per 2-token request ({times(b / a)})"])
    return out



# a blend's stages in the order they run (in a synced profile fetch_wait also drains the work queued before each wait)
PROFILE_STAGES = ("fetch_wait", "rope_shift_gather", "qkv", "attention", "mlp", "select", "post_check_graphs")


def profile_table(profiled: list[dict], title: str, source: str) -> Table:
    """Each size's profiled blend: its stages' device times and, where timed by CUDA events, the chunk KV's copy
    rate (older runs synced the device at each stage instead, and counted a post-check layer's fill twice)."""
    events = all(r["profile"].get("timed_by") == "cuda_events" for r in profiled)
    how = ("stages timed by CUDA events, each counted once" if events else
           "the device waited for at each stage; post_check_graphs includes its layers' fetch_wait and rope_shift_gather")
    h2d = [r["profile"].get("h2d") or {} for r in profiled]
    return Table(f"Where a blend's device time goes, {title} (vllm_gpu_rag, one profiled request a size: {how})",
                 (source,), ["tokens", "TTFT ms", "blend ms", *(f"{s} ms" for s in PROFILE_STAGES),
                             *(["chunk KV to GPU GB/s (copy ms)"] if events else [])],
                 [[str(r["tokens"]), ms(r["profile"]["ttft_ms"]), ms(r["profile"]["blend_ms"]),
                   *(ms(r["profile"]["stage_ms"].get(s, 0.0)) for s in PROFILE_STAGES),
                   *([f"{c['GBps']} ({c['copies_ms']})" if c else ""] if events else [])]
                  for r, c in zip(profiled, h2d)], "")


def vllm_gpu_rag() -> list[Table]:
    tables = []
    for path in sorted(RESULTS.glob("vllm_gpu_rag_*.json")):
        data = json.loads(path.read_text())
        stamp = provenance(data)
        device = stamp["device"]
        title = f"{device}, {stamp['sha']}"  # one table per run
        rows = [[r["mode"], r["scenario"], str(r["tokens"]),
                 f"{ms(r['ttft_ms_median'])} [{ms(r['ttft_ms_min'])}, {ms(r['ttft_ms_max'])}]",
                 "" if r["speedup_vs_vllm"] is None else times(r["speedup_vs_vllm"]), ms(r["wall_ms_median"]), served_as(r)]
                for r in data["rows"]]
        targets = gpu_rag_targets(data)
        blend = [r for r in data["rows"] if r["mode"] == "kvblend_blend"]
        blended = sum(rep.get("mode") == "blend" for r in blend for rep in r.get("reports", []))
        storage = next((r for r in data["rows"] if r["mode"] == "kvblend_storage" and r["scenario"] == "doc_evicted"),
                       None)
        headline = (f"{device}, inside vLLM {data['vllm_version']} (Llama-3-8B shape, bf16, GPU defaults): "
                    f"{blended} of {sum(r['n'] for r in blend)} RAG requests blended; kvblend's TTFT against plain "
                    f"vLLM with prefix caching " + ", ".join(f"{times(r['speedup_vs_vllm'])} at {r['tokens']} tokens"
                                                             for r in blend)
                    + (f"; storage mode on an evicted {storage['tokens']}-token document "
                       f"{times(storage['speedup_vs_vllm'])}" if storage else "")
                    + "; issue 27's targets: " + ", ".join(f"{sum(t[1] == v for t in targets)} {v}"
                                                        for v in ("met", "missed", "not measured")) + ".")
        tables.append(Table(f"One GPU, every system inside vLLM, {title} (vllm_gpu_rag)", (path.name,),
                            ["mode", "scenario", "tokens", "median TTFT ms [min, max]", "vs vLLM", "wall ms", "served as"],
                            rows,
                            headline))
        tables.append(Table(f"Issue 27's targets on {title} (vllm_gpu_rag)", (path.name,),
                            ["target", "verdict", "figure"], targets, ""))
        profiled = [r for r in blend if (r.get("profile") or {}).get("profiled")]
        if profiled:
            tables.append(profile_table(profiled, title, path.name))
    return tables


QUESTIONS: list[Callable[[], Table | list[Table]]] = [
    fidelity, codec_fidelity, gate, rag_ttft_cpu, server_ttft, workloads, gpu_blend, vllm_gpu_rag, index_throughput,
    prefetch_vllm, store_tiers, store_codecs, store_cluster, store_prefetch, pd_ttft, peer, nixl_gpu]


def tables() -> list[Table]:
    out = []
    for question in QUESTIONS:
        got = question()
        out += got if isinstance(got, list) else [got]
    return out


def source_line(name: str) -> str:
    p = provenance(load(name))
    command = f"`{p['command']}`" if p["command"] != "command not recorded" else p["command"]
    return f"- {command} — {p['device']}, {p['date']}, {p['sha']} (`benchmarks/results/{name}`)"


def results_block(found: list[Table]) -> str:
    parts = []
    for t in found:
        parts.append(f"### {t.question}\n\n" + "\n".join(source_line(n) for n in t.sources) + "\n\n| "
                     + " | ".join(t.header) + " |\n|" + "---|" * len(t.header) + "\n"
                     + "\n".join("| " + " | ".join(r) + " |" for r in t.rows))
    return "\n\n".join(parts)


def readme_block(found: list[Table]) -> str:
    stamps = [provenance(load(t.sources[0])) for t in found]  # per table: several may answer one question
    lines = [wrap(f"- {t.headline} ({p['date']}, {p['sha']})", "  ") for t, p in zip(found, stamps) if t.headline]
    return wrap("Every figure below is read from `benchmarks/results/` by `python -m benchmarks.report`; the "
                "tables, commands, devices, dates and shas are in `benchmarks/RESULTS.md`.") + "\n\n" + "\n".join(lines)


def wrap(text: str, indent: str = "") -> str:
    """A paragraph at the README's line length, code spans kept whole."""
    return textwrap.fill(text, width=115, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def fill(text: str, block: str, where: Path) -> str:
    """`text` with what lies between the markers replaced by `block`."""
    if START not in text or END not in text:
        raise SystemExit(f"{where}: the markers {START} and {END} are missing")
    head, rest = text.split(START, 1)
    return f"{head}{START}\n{block}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md or README.md would change")
    args = parser.parse_args(argv)
    found = tables()
    stale = []
    for path, block in ((RESULTS_MD, results_block(found)), (README, readme_block(found))):
        text = path.read_text()
        new = fill(text, block, path)
        if new != text:
            stale.append(path.name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run `python -m benchmarks.report`")
        return 1
    print(("rewrote " + ", ".join(stale)) if stale else "RESULTS.md and README.md agree with benchmarks/results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
