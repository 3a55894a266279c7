"""Prometheus metrics of one server (own registry: two servers in one process never share counters)."""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("dsaserve_num_running_reqs", "requests decoding", ["dp_rank"], registry=r)
        self.queued = Gauge("dsaserve_num_queue_reqs", "requests waiting", ["dp_rank"], registry=r)
        self.transferring = Gauge("dsaserve_num_transfer_queue_reqs", "PD decode side: requests holding pages "
                                  "while their KV cache is on its way", ["dp_rank"], registry=r)
        self.token_usage = Gauge("dsaserve_token_usage", "fraction of KV pages in use", ["dp_rank"], registry=r)
        # Engine totals since start (gauges: the engine counts, this process only reports them)
        self.totals = {name: Gauge(f"dsaserve_{name}", doc, ["dp_rank"], registry=r) for name, doc in (
            ("spec_verify_steps", "request-verify steps of MTP speculative decoding"),
            ("spec_draft_tokens", "draft tokens proposed to verification"),
            ("spec_accepted_tokens", "draft tokens accepted"),
            ("prefix_hit_tokens", "prompt tokens served from the prefix cache"),
            ("prefix_queried_tokens", "prompt tokens of admitted requests"),
            ("graph_captures", "CUDA graph captures (after start-up: a request waited on one)"),
            ("graph_eager_misses", "steps run eagerly because no CUDA graph had their shape"),
            ("kernel_compiles", "Triton kernel compilations (after start-up: a request waited on one)"))}
        self.accept_length = Gauge("dsaserve_spec_accept_length", "tokens per verify step per request (accepted "
                                   "drafts + 1)", ["dp_rank"], registry=r)
        self.prompt_tokens = Counter("dsaserve_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("dsaserve_generation_tokens", "generated tokens", registry=r)
        self.requests = Counter("dsaserve_requests", "finished requests", ["finish_reason"], registry=r)
        self.ttft = Histogram("dsaserve_time_to_first_token_seconds", "time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dsaserve_inter_token_latency_seconds", "time between output tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("dsaserve_e2e_request_latency_seconds", "request latency, arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def observe_tokens(self, n: int, since_last: float, first: bool) -> None:
        """n tokens arrived `since_last` seconds after the previous ones: the first ones' time is TTFT; later, n
        gaps of since_last / n (MTP commits several tokens a step: inter-token latency is per token, as SGLang
        counts it)."""
        self.generation_tokens.inc(n)
        if first:
            self.ttft.observe(since_last)
            return
        for _ in range(n):
            self.itl.observe(since_last / max(n, 1))

    def observe_finish(self, reason: str, prompt_tokens: int, latency: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.requests.labels(finish_reason=reason).inc()
        self.e2e.observe(latency)

    def render(self, states: list[dict[str, Any]]) -> bytes:
        for s in states:
            rank = str(s["dp_rank"])
            if "running" not in s:  # a dead rank: drop its series rather than report stale values
                for gauge in (self.running, self.queued, self.transferring, self.token_usage, self.accept_length,
                              *self.totals.values()):
                    try:
                        gauge.remove(rank)
                    except KeyError:
                        pass
                continue
            self.running.labels(dp_rank=rank).set(s["running"])
            self.queued.labels(dp_rank=rank).set(s["waiting"])
            self.transferring.labels(dp_rank=rank).set(s["transferring"])
            self.token_usage.labels(dp_rank=rank).set(1.0 - s["free_pages"] / max(s["total_pages"], 1))
            for name, gauge in self.totals.items():
                gauge.labels(dp_rank=rank).set(s.get(name, 0))
            if s.get("avg_spec_accept_length") is not None:
                self.accept_length.labels(dp_rank=rank).set(s["avg_spec_accept_length"])
        return generate_latest(self.registry)
