"""EngineStats: what one DP group's engine reports (/get_server_info, /metrics, benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    free_pages: int
    total_pages: int
    num_retractions: int
    steps: int
    spec_verify_steps: int = 0  # request-verify steps (one per request per verify step)
    spec_draft_tokens: int = 0  # draft tokens proposed to verification
    spec_accepted_tokens: int = 0  # of those, accepted
    cached_pages: int = 0  # pages the prefix cache holds (free_pages counts those no request uses)
    prefix_hit_tokens: int = 0  # prompt tokens served from the prefix cache
    prefix_queried_tokens: int = 0
    graph_shapes: int = 0  # static layouts (CUDA graphs on a GPU) made so far: constant once warmed up on a GPU,
    # made as steps need them on CPU (nothing is captured there)
    graph_captures: int = 0  # CUDA graph captures; one after the server is ready is a stall
    graph_eager_misses: int = 0  # steps that ran eagerly because no graph had their shape
    kernel_compiles: int = 0  # Triton compilations in this process; constant once the server is ready
    transferring: int = 0  # PD decode side: requests holding pages while their KV cache is on its way
    max_running_requests: int = 0  # this group's share of --max-running-requests (ServerArgs.running_per_group)
    chunked_prefill_size: int = 0  # this group's share of --chunked-prefill-size: tokens per step
    queued_tokens: int = 0  # tokens of the queued requests (a retracted one's output too): SGLang's load counts them

    @property
    def avg_spec_accept_length(self) -> float | None:
        """Tokens a verify step yields per request: accepted drafts + the target's own token (the drafts' quality:
        counted before max_tokens or a stop cuts the output)."""
        if not self.spec_verify_steps:
            return None
        return (self.spec_accepted_tokens + self.spec_verify_steps) / self.spec_verify_steps
