"""`dsaserve bench serving`'s report: the run's metrics (throughput, TTFT, TPOT, ITL, end-to-end latency as
mean / median / p99) as JSON and as the printed table."""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsaserve.bench.serving import BenchConfig, RequestResult


def _summary(values: list[float], name: str) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values) or [0.0]
    p99 = ms[min(len(ms) - 1, max(0, math.ceil(0.99 * len(ms)) - 1))]
    return {f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms),
            f"p99_{name}_ms": p99}


def compute_metrics(cfg: BenchConfig, results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    metrics: dict[str, Any] = {
        "backend": "openai-completions", "base_url": cfg.base_url, "duration_s": duration,
        "completed": len(ok), "failed": len(results) - len(ok), "total_input_tokens": total_in,
        "total_output_tokens": total_out, "request_throughput": len(ok) / duration,
        "input_throughput": total_in / duration, "output_throughput": total_out / duration,
        **_summary([r.ttft for r in ok], "ttft"), **_summary(tpot, "tpot"),
        **_summary([x for r in ok for x in r.itl], "itl"), **_summary([r.latency for r in ok], "e2e_latency"),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "config": {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf")
                   for k, v in asdict(cfg).items() if k != "api_key"}}
    return metrics


def format_table(m: dict[str, Any]) -> str:
    rows = [("Successful requests", f"{m['completed']}"), ("Failed requests", f"{m['failed']}"),
            ("Duration (s)", f"{m['duration_s']:.2f}"), ("Total input tokens", f"{m['total_input_tokens']}"),
            ("Total output tokens", f"{m['total_output_tokens']}"),
            ("Request throughput (req/s)", f"{m['request_throughput']:.2f}"),
            ("Input token throughput (tok/s)", f"{m['input_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{m['output_throughput']:.2f}")]
    if m.get("accept_length") is not None:
        rows.append(("Accept length (MTP)", f"{m['accept_length']:.2f}"))
    if m.get("prefix_hit_rate") is not None:
        rows.append(("Prefix cache hit rate", f"{m['prefix_hit_rate']:.1%}"))
    for name, title in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e_latency", "E2E latency")):
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {title} (ms)", f"{m[f'{stat}_{name}_ms']:.2f}"))
    width = max(len(k) for k, _ in rows) + 2
    line = "=" * (width + 14)
    body = "\n".join(f"{k:<{width}}{v:>14}" for k, v in rows)
    return f"{line}\n{'Serving Benchmark Result':^{width + 14}}\n{line}\n{body}\n{line}"
