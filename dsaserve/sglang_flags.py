"""SGLang launch flags that dsaserve does not take, each with what to use instead: a launch line copied from
SGLang's DeepSeek-V3.2 / GLM-5 pages then fails with sentences that say what to change, not with argparse's
bare "unrecognized arguments". (The flags dsaserve shares with SGLang, under either of its names, are
ServerArgs fields; those of ALWAYS_ON name what dsaserve always does: accepted, they change nothing.)"""
from __future__ import annotations

_NO_ALL_TO_ALL = ("dsaserve's expert parallelism (--ep) combines the experts' outputs by the same all-reduce as "
                  "tensor parallelism, with no all-to-all backend; leave it out")
_ONE_ATTENTION_BACKEND = ("dsaserve uses one sparse-attention backend for prefill and decode: "
                          "--attention-backend auto|triton|flashmla|torch")

NOT_TAKEN: dict[str, str] = {
    "--moe-a2a-backend": _NO_ALL_TO_ALL,
    "--enable-deepep-moe": _NO_ALL_TO_ALL,
    "--deepep-mode": _NO_ALL_TO_ALL,
    "--enable-ep-moe": "SGLang's older spelling of --ep = --tp: give --ep N",
    "--enable-eplb": "dsaserve has no expert-load balancer (no redundant experts); leave it out",
    "--ep-num-redundant-experts": "dsaserve has no expert-load balancer (no redundant experts); leave it out",
    "--nsa-prefill-backend": _ONE_ATTENTION_BACKEND,
    "--nsa-decode-backend": _ONE_ATTENTION_BACKEND,
    "--max-prefill-tokens": "use --chunked-prefill-size: it bounds the tokens of one step (prompt chunks and the "
                            "decode rows beside them)",
    "--watchdog-timeout": "use --dist-timeout (how long a step's collectives may wait); GET /health_generate "
                          "answers 503 when no step completes",
    "--enable-torch-compile": "dsaserve runs Triton kernels under CUDA graphs; it has no torch.compile path",
    "--schedule-policy": "dsaserve admits requests first come, first served (the prefix cache needs no policy)",
    "--quantization": "FP8 checkpoints are served in FP8 from their config.json's quantization_config; leave it out",
    "--tokenizer-path": "dsaserve reads the tokenizer from --model-path",
    "--speculative-draft-model-path": "MTP drafts with the checkpoint's own MTP layer (--speculative-algorithm "
                                      "NEXTN); leave it out",
    "--stream-interval": "dsaserve streams every step's tokens; leave it out",
    "--enable-two-batch-overlap": "dsaserve has no two-batch overlap (it hides an all-to-all that dsaserve's "
                                  "expert parallelism does not use); leave it out",
    "--moe-dense-tp-size": "dsaserve splits the dense layers' MLP over every --tp rank; leave it out",
    "--disable-shared-experts-fusion": "dsaserve stacks the shared expert beside the routed ones where it can and "
                                       "has no switch for it; leave it out",
    "--dsa-topk-backend": "dsaserve has one indexer top-k (its Triton kernels on CUDA); leave it out",
    "--enable-custom-logit-processor": "dsaserve takes no custom logit processors (it has logit_bias, penalties, "
                                       "min_tokens, thinking_budget and structured output); leave it out",
    "--decode-log-interval": "dsaserve logs no per-interval decode lines: GET /metrics or /get_server_info",
    "--tokenizer-worker-num": "dsaserve tokenizes on two threads of the HTTP server's process; leave it out",
}
# SGLang flags whose behaviour is dsaserve's only one: accepted, changing nothing (ServerArgs.add_cli_args)
ALWAYS_ON = {
    "--trust-remote-code": "dsaserve runs no code from a checkpoint",
    "--enable-metrics": "/metrics is always served",
    "--enable-cache-report": "usage always carries prompt_tokens_details.cached_tokens",
    "--disable-custom-all-reduce": "the collectives are NCCL's (gloo on CPU); there is no custom all-reduce",
    "--enable-dp-lm-head": "the LM head is split over each DP group's attention ranks, never gathered across groups",
    "--enable-strict-thinking": "a request's thinking_budget is always exact (the sampler ends the reasoning there)",
}


def guidance(unknown: list[str]) -> tuple[list[str], bool]:
    """For argparse's leftovers: one line per SGLang flag listed above, and whether that is every flag there
    (otherwise argparse reports the leftovers in its own words too)."""
    flags = list(dict.fromkeys(a.split("=", 1)[0] for a in unknown if a.startswith("-")))
    known = [f for f in flags if f in NOT_TAKEN]
    lines = [f"{f} is an SGLang flag that dsaserve does not take: {NOT_TAKEN[f]}" for f in known]
    return lines, bool(flags) and len(known) == len(flags)
