"""ServerArgs: every flag and its default, in one frozen dataclass; the CLI is generated from it."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from dsaserve.sglang_flags import ALWAYS_ON

# --kv-cache-dtype names (SGLang's / vLLM's): auto (the compute dtype), bf16 / bfloat16, fp8_e4m3 (cache/pools.py)
KV_CACHE_DTYPE_NAMES = ("auto", "bf16", "bfloat16", "fp8_e4m3")
RUNNING_PER_GROUP = 256  # --max-running-requests when not given: per DP group (per server without DP attention)


class SettingError(ValueError):
    """A flag this deployment cannot serve (the message names it), found where the engine starts: the server
    reports it in one line and exits 2, as it does for the flags it checks before starting."""


def split_host_port(addr: str) -> tuple[str, int] | None:
    """'host:port' or '[v6]:port' -> (host, port); None if it is not one."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ServerArgs:
    model_path: str | None = _opt(None, "checkpoint folder (config.json, safetensors, tokenizer); "
                                        "omitted: the embedded tiny model", aliases=("--model",))
    served_model_name: str | None = _opt(None, "model name reported by the API (default: the folder name)")
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(30000, "port to listen on")
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' on API calls")
    device: str = _opt("auto", "cuda or cpu (auto: cuda when available)")
    dtype: str = _opt("auto", "activation and weight dtype: auto (bf16 on cuda, fp32 on cpu), "
                               "bfloat16, float16, float32")
    kv_cache_dtype: str = _opt("auto", "latent and index-key cache dtype: auto (the --dtype), bf16 (alias bfloat16), "
                                       "fp8_e4m3 (FlashMLA's 656-byte latent rows: e4m3 + fp32 scales per 128 "
                                       "values + bf16 rope; index keys e4m3 + one fp32 scale per 128)")
    tp: int = _opt(1, "tensor-parallel size (ranks on this machine x nnodes)",
                   aliases=("--tp-size", "--tensor-parallel-size"))
    dp: int = _opt(1, "data-parallel size (with --enable-dp-attention: DP attention groups)",
                  aliases=("--dp-size", "--data-parallel-size"))
    enable_dp_attention: bool = _opt(False, "attention runs data-parallel in --dp groups, MoE over all ranks")
    ep: int = _opt(1, "expert-parallel size: the routed experts are divided among --ep groups of --tp / --ep ranks "
                      "(--ep = --tp: each rank holds n_routed_experts / tp whole experts; 1: every expert is split "
                      "over all ranks); the MoE still combines by all-reduce (no all-to-all)",
                   aliases=("--ep-size", "--expert-parallel-size"))
    nnodes: int = _opt(1, "number of machines")
    node_rank: int = _opt(0, "rank of this machine")
    dist_init_addr: str | None = _opt(None, "host:port of node 0 for torch.distributed; its store listens on this "
                                            "host only (default: 127.0.0.1 and a free port, one node)")
    dist_timeout: int | None = _opt(None, "seconds a collective inside a step (or start-up) may wait for the other "
                                          "ranks before the deployment fails (default 1800, for NCCL too, whose "
                                          "own is 10 min); ranks waiting for work wait without a deadline")
    page_size: int = _opt(64, "tokens per KV cache page (1 or 64 are tested)")
    max_total_tokens: int | None = _opt(None, "KV cache capacity in tokens (default: from --mem-fraction)")
    mem_fraction: float = _opt(0.88, "share of the device memory (free before the weights load) that the weights "
                                       "and the KV pool take together, SGLang's --mem-fraction-static: the rest "
                                       "is left to activations, CUDA graphs and communication buffers (CPU: of "
                                       "available RAM, the pool at most 1 GiB)",
                               aliases=("--mem-fraction-static",))
    max_running_requests: int | None = _opt(None, "most requests decoding at once; under DP attention the total "
                                                  "over the DP groups, each taking its share (SGLang's rule; "
                                                  f"default {RUNNING_PER_GROUP} per DP group)")
    max_queued_requests: int = _opt(4096, "most requests waiting; more get 503")
    responses_store_size: int = _opt(1000, "responses /v1/responses keeps in memory for previous_response_id and "
                                           "GET /v1/responses/{id} (the least recently used go first; 0 keeps none)")
    chunked_prefill_size: int = _opt(8192, "most tokens in one step (prompt chunks and, mixed, decode rows); "
                                           "under DP attention the total over the DP groups, each taking its share "
                                           "(SGLang's rule)")
    enable_mixed_chunk: bool = _opt(True, "decode rows of running requests share steps with prefill chunks "
                                          "(--no-enable-mixed-chunk: a step prefills or decodes)")
    disable_overlap_schedule: bool = _opt(False, "schedule each step after the previous one's tokens are "
                                                 "committed (overlap is on without speculation "
                                                 "or PD: the host schedules and commits while the GPU runs)")
    context_length: int | None = _opt(None, "longest prompt + completion (default: the model's)")
    disable_radix_cache: bool = _opt(False, "do not reuse the cache of repeated prompt prefixes")
    json_model_override_args: str | None = _opt(None, "a JSON object whose fields replace config.json's (SGLang's "
                                                      "flag), e.g. '{\"max_position_embeddings\": 32768}'; "
                                                      "model_type excepted")
    load_format: str = _opt("auto", "auto (the checkpoint's safetensors) or dummy (random weights in the formats the "
                                    "config.json implies, FP8 included: benchmark a real config without its weights)")
    attention_backend: str = _opt("auto", "torch, triton or flashmla (FlashMLA's sparse MLA kernels where its module "
                                          "is built, Hopper; auto: flashmla over an FP8 cache where it can run, "
                                          "else triton on cuda, torch on cpu)")
    moe_backend: str = _opt("auto", "torch or triton (auto: triton on cuda, torch on cpu)")
    indexer_max_logits_mb: int = _opt(512, "memory budget of one indexer logits chunk, in MiB (at least 16 rows "
                                           "per chunk whatever the budget)")
    cuda_graph_max_bs: int | None = _opt(None, "replay decode / verify / draft steps of up to this many "
                                               "requests from CUDA graphs (default: 64 on cuda with the triton "
                                               "backends, else off; 0: off; on CPU the same padded static layouts "
                                               "run eagerly)")
    cuda_graph_bs: tuple[int, ...] | None = _opt(None, "the batch sizes to capture graphs for (default: 1, 2, 4, 8 "
                                                       "and multiples of 16 up to --cuda-graph-max-bs, which "
                                                       "defaults to their largest); a step pads to the next one")
    speculative_algorithm: str | None = _opt(None, "NEXTN (EAGLE is an alias): MTP speculative decoding with the "
                                                   "checkpoint's MTP layer as the draft model")
    speculative_num_steps: int | None = _opt(None, "draft steps S per verify step (default 3 with "
                                                   "--speculative-algorithm)")
    speculative_eagle_topk: int | None = _opt(None, "drafts per draft step (only 1 is supported)")
    speculative_num_draft_tokens: int | None = _opt(None, "tokens per verify step, S + 1 (the only value "
                                                          "supported with topk 1)")
    chat_template: str | None = _opt(None, "a Jinja chat template file that replaces the tokenizer's own (its chat "
                                           "format is then that template's, as --tokenizer-mode hf)")
    tokenizer_mode: str = _opt("auto", "chat encoding: auto (the tokenizer's chat template; DeepSeek-V3.2's "
                                       "published encoding for a deepseek_v32 model without one), hf, deepseek_v32")
    reasoning_parser: str | None = _opt(None, "split reasoning into reasoning_content: deepseek-v3 or glm45 "
                                              "(default: reasoning stays in content)")
    tool_call_parser: str | None = _opt(None, "parse tool calls: deepseekv32, glm45 or glm47 (default: by "
                                              "model type, deepseekv32 for deepseek_v32, glm47 for glm_moe_dsa)")
    grammar_backend: str = _opt("llguidance", "constrained decoding for response_format / regex / ebnf and "
                                              "forced tool calls: llguidance or none")
    sampling_defaults: str = _opt("model", "the sampling fields (temperature, top_p, top_k, min_p, "
                                           "repetition_penalty) an OpenAI request leaves out: model (from the "
                                           "checkpoint's generation_config.json, else openai's) or openai (1, 1, "
                                           "off, 0, 1)")
    disaggregation_mode: str = _opt("null", "prefill/decode disaggregation role: null (serve whole requests), "
                                            "prefill or decode (requests that carry bootstrap_room move their KV "
                                            "cache from the prefill server to the decode server)")
    disaggregation_transfer_backend: str = _opt("nixl", "KV transfer backend: nixl, or fake (no data moves; "
                                                        "scheduler tests); mooncake is not available yet")
    disaggregation_bootstrap_port: int = _opt(8998, "prefill side: port of the bootstrap server that decode "
                                                    "servers ask where a request's KV cache lives")
    disaggregation_ib_device: str | None = _opt(None, "network devices the transfer backend uses (UCX_NET_DEVICES "
                                                      "for nixl), e.g. mlx5_0,mlx5_1 (SGLang's form: port 1 each) "
                                                      "or mlx5_0:1")
    disaggregation_timeout_s: float = _opt(120.0, "a request waiting on the other server (its KV cache, or the "
                                                  "decode server's pages) fails after this many seconds")
    max_request_bytes: int = _opt(16 * 2**20, "largest HTTP request body accepted; larger ones get 413 before "
                                               "they are parsed")
    skip_server_warmup: bool = _opt(False, "serve at once, without first running a few prompts through the engine "
                                           "(they compile the prefill-shaped kernels on a GPU)")
    seed: int = _opt(0, "seed for requests that carry none", aliases=("--random-seed",))
    log_level: str = _opt("info", "debug, info, warning, error")
    log_requests: bool = _opt(False, "log each request when accepted and when it ends (SGLang's flag; "
                                     "--log-requests-level says how much)")
    log_requests_level: int = _opt(2, "0: ids, token counts, finish and latency; 1: and the sampling parameters; "
                                      "2: and the first and last 256 characters of prompt and output; 3: all of them")
    enable_deterministic_inference: bool = _opt(False, "batch-invariant inference: a request's tokens and "
                                                       "log-probabilities are bitwise the same whatever else runs "
                                                       "beside it, however its prompt is chunked, with or without "
                                                       "speculation or a cached prefix (CPU only, slower)")
    checks: bool = _opt(False, "validate every BatchLayout and kernel input (also DSASERVE_CHECKS=1)")

    def __post_init__(self) -> None:
        problems = []
        if self.page_size < 1:
            problems.append(f"--page-size must be >= 1, got {self.page_size}")
        if self.tp < 1 or self.dp < 1:
            problems.append(f"--tp and --dp must be >= 1, got {self.tp} and {self.dp}")
        elif self.tp % self.dp:
            problems.append(f"--dp ({self.dp}) must divide --tp ({self.tp})")
        if self.ep < 1:
            problems.append(f"--ep must be >= 1, got {self.ep}")
        elif self.tp >= 1 and self.tp % self.ep:
            problems.append(f"--ep ({self.ep}) must divide --tp ({self.tp})")
        if self.dp > 1 and not self.enable_dp_attention:
            problems.append("--dp > 1 needs --enable-dp-attention")
        if self.chunked_prefill_size == -1:  # SGLang's "no chunking"
            problems.append("--chunked-prefill-size -1 (SGLang: no chunked prefill) is not taken: give the most "
                            "tokens one step may carry (prompt chunks and decode rows; default 8192)")
        elif self.chunked_prefill_size < self.dp_groups:
            problems.append(f"--chunked-prefill-size must be >= 1{self._per_group()}, got {self.chunked_prefill_size}")
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 0:
            problems.append(f"--cuda-graph-max-bs must be >= 0, got {self.cuda_graph_max_bs}")
        if self.cuda_graph_bs is not None and (not self.cuda_graph_bs or min(self.cuda_graph_bs) < 1):
            problems.append(f"--cuda-graph-bs must list batch sizes >= 1, got {list(self.cuda_graph_bs)}")
        problems += self._speculative_problems()
        if self.served_model_name is not None and not self.served_model_name.strip():
            problems.append("--served-model-name must not be empty (leave it out for the folder's name)")
        if self.max_running_requests is not None and self.max_running_requests < self.dp_groups:
            problems.append(f"--max-running-requests must be >= 1{self._per_group()}, got {self.max_running_requests}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            problems.append(f"--dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPE_NAMES:
            problems.append(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPE_NAMES)}, "
                            f"got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ("auto", "torch", "triton", "flashmla"):
            problems.append("--attention-backend must be auto, torch, triton or flashmla")
        if self.moe_backend not in ("auto", "torch", "triton"):
            problems.append("--moe-backend must be auto, torch or triton")
        if self.load_format not in ("auto", "dummy"):
            problems.append(f"--load-format must be auto or dummy, got {self.load_format!r}")
        problems += _chat_problems(self) + self._serving_problems() + _disaggregation_problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    def _serving_problems(self) -> list[str]:
        """Flags checked before anything loads: every message names its flag."""
        problems = []
        if not 0 < self.mem_fraction <= 1:
            problems.append(f"--mem-fraction must be in (0, 1], got {self.mem_fraction}")
        if not 1 <= self.port <= 65535:
            problems.append(f"--port must be in [1, 65535], got {self.port}")
        for name in ("context_length", "max_total_tokens", "dist_timeout"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.max_queued_requests < 1:  # 0 would refuse every request (each waits in the queue first)
            problems.append(f"--max-queued-requests must be >= 1, got {self.max_queued_requests}")
        if self.responses_store_size < 0:
            problems.append(f"--responses-store-size must be >= 0, got {self.responses_store_size}")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("--api-key must not be empty (leave it out to serve without a key)")
        if self.max_request_bytes < 1:
            problems.append(f"--max-request-bytes must be >= 1, got {self.max_request_bytes}")
        if not 0 <= self.log_requests_level <= 3:
            problems.append(f"--log-requests-level must be 0, 1, 2 or 3, got {self.log_requests_level}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            problems.append(f"--log-level must be debug, info, warning or error, got {self.log_level!r}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            problems.append(f"--node-rank must be in [0, --nnodes) and --nnodes >= 1, got {self.node_rank} "
                            f"and {self.nnodes}")
        if self.dist_init_addr is not None and split_host_port(self.dist_init_addr) is None:
            problems.append(f"--dist-init-addr must be HOST:PORT with a port in [1, 65535], got "
                            f"{self.dist_init_addr!r}")
        return problems + self._override_problems() + self._multi_node_problems()

    def _override_problems(self) -> list[str]:
        if self.json_model_override_args is None:
            return []
        try:
            overrides = json.loads(self.json_model_override_args)
        except json.JSONDecodeError as exc:
            return [f"--json-model-override-args is not valid JSON: {exc}"]
        if not isinstance(overrides, dict):
            return [f"--json-model-override-args must be a JSON object of config.json fields, got "
                    f"{self.json_model_override_args!r}"]
        if "model_type" in overrides:  # the tokenizer's chat format and parsers follow the folder's
            return ["--json-model-override-args cannot change model_type"]
        return []

    @property
    def model_overrides(self) -> dict[str, Any]:
        """--json-model-override-args as a dict (checked in __post_init__): config.json's fields it replaces."""
        return json.loads(self.json_model_override_args) if self.json_model_override_args else {}

    def _multi_node_problems(self) -> list[str]:
        if self.nnodes == 1:
            return []
        if self.dist_init_addr is None:
            return ["--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)"]
        if self.tp % self.nnodes:
            return [f"--tp ({self.tp}) must be divisible by --nnodes ({self.nnodes})"]
        last_leader = (self.dp - 1) * (self.tp // max(self.dp, 1))
        if last_leader >= self.tp // self.nnodes:
            return [f"every DP group leader must run on node 0 (it talks to the HTTP frontend), but rank "
                    f"{last_leader} leads DP group {self.dp - 1}: use fewer DP groups or fewer nodes"]
        return []

    def _speculative_problems(self) -> list[str]:
        if self.speculative_algorithm is None:
            given = [n for n in ("speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens")
                     if getattr(self, n) is not None]
            return [f"--{given[0].replace('_', '-')} needs --speculative-algorithm NEXTN"] if given else []
        problems = []
        if self.speculative_algorithm.upper() not in ("NEXTN", "EAGLE"):
            problems.append(f"--speculative-algorithm must be NEXTN (or its alias EAGLE), got "
                            f"{self.speculative_algorithm!r}")
        steps = self.spec_steps
        if not 1 <= steps <= 16:
            problems.append(f"--speculative-num-steps must be in [1, 16], got {steps}")
        if self.speculative_eagle_topk not in (None, 1):
            problems.append(f"--speculative-eagle-topk {self.speculative_eagle_topk} is not supported: MTP drafts "
                            f"one token per step (topk 1)")
        if self.speculative_num_draft_tokens not in (None, steps + 1):
            problems.append(f"--speculative-num-draft-tokens must be --speculative-num-steps + 1 = {steps + 1} with "
                            f"topk 1, got {self.speculative_num_draft_tokens}")
        return problems

    @property
    def spec_steps(self) -> int:
        """Draft steps S per verify step; 0 without speculative decoding."""
        if self.speculative_algorithm is None:
            return 0
        return 3 if self.speculative_num_steps is None else self.speculative_num_steps

    @property
    def dp_groups(self) -> int:
        """DP attention groups, each with its own scheduler and requests (1 without DP attention)."""
        return self.dp if self.enable_dp_attention and self.dp >= 1 else 1

    def _per_group(self) -> str:
        return f" per DP group ({self.dp_groups})" if self.dp_groups > 1 else ""

    @property
    def running_per_group(self) -> int:
        """One DP group's --max-running-requests: its share of the total, as SGLang divides it."""
        if self.max_running_requests is None:
            return RUNNING_PER_GROUP
        return self.max_running_requests // self.dp_groups

    @property
    def tokens_per_group(self) -> int:
        """One DP group's step budget: its share of --chunked-prefill-size (SGLang divides it by the DP size, so
        the MoE, which takes every group's rows, sees at most the total)."""
        return self.chunked_prefill_size // self.dp_groups

    def replace(self, **changes: Any) -> ServerArgs:
        return dataclasses.replace(self, **changes)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        hints = get_type_hints(cls)
        for flag, why in ALWAYS_ON.items():  # SGLang's launch lines carry them; here they change nothing
            parser.add_argument(flag, action="store_true", help=f"accepted for SGLang's launch lines ({why})")
        parser.add_argument("--disable-cuda-graph", action="store_true", help="SGLang's name for "
                            "--cuda-graph-max-bs 0")
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flag = ("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()))  # SGLang's other names too
            kind = hints[f.name]
            if kind is bool:
                action = argparse.BooleanOptionalAction if f.default else "store_true"
                parser.add_argument(*flag, action=action, default=f.default, help=f.metadata["help"])
                continue
            kinds = getattr(kind, "__args__", (kind,))
            many = any(getattr(k, "__origin__", None) is tuple for k in kinds)  # tuple[int, ...]: a list flag
            base = int if many else next(t for t in (int, float, str) if t in kinds)
            suffix = "" if f.default is None else f" (default: {f.default})"
            parser.add_argument(*flag, type=base, default=f.default, help=f.metadata["help"] + suffix,
                                **({"nargs": "+"} if many else {}))

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> ServerArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items() if k in names}
        if getattr(ns, "disable_cuda_graph", False):
            if values.get("cuda_graph_max_bs") not in (None, 0) or values.get("cuda_graph_bs") is not None:
                raise ValueError("--disable-cuda-graph contradicts --cuda-graph-max-bs / --cuda-graph-bs: give one")
            values["cuda_graph_max_bs"] = 0
        return cls(**values)


def _chat_problems(args: ServerArgs) -> list[str]:
    from dsaserve.chat.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS
    from dsaserve.chat.render import TOKENIZER_MODES
    from dsaserve.generation_config import SAMPLING_DEFAULTS
    choices = [("tokenizer_mode", TOKENIZER_MODES, False), ("reasoning_parser", REASONING_PARSERS, True),
               ("tool_call_parser", TOOL_CALL_PARSERS, True), ("grammar_backend", ("llguidance", "none"), False),
               ("sampling_defaults", SAMPLING_DEFAULTS, False)]
    problems = [f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(args, name)!r}"
                for name, allowed, optional in choices
                if getattr(args, name) not in allowed and not (optional and getattr(args, name) is None)]
    if args.chat_template is not None and args.tokenizer_mode == "deepseek_v32":
        problems.append("--chat-template replaces the tokenizer's template, and --tokenizer-mode deepseek_v32 uses "
                        "DeepSeek-V3.2's published encoding instead of any template: give one of them")
    return problems


def _disaggregation_problems(args: ServerArgs) -> list[str]:
    problems = []
    if args.disaggregation_mode not in ("null", "prefill", "decode"):
        problems.append(f"--disaggregation-mode must be null, prefill or decode, got {args.disaggregation_mode!r}")
    if args.disaggregation_transfer_backend not in ("nixl", "mooncake", "fake"):
        problems.append(f"--disaggregation-transfer-backend must be nixl, mooncake or fake, got "
                        f"{args.disaggregation_transfer_backend!r}")
    elif args.disaggregation_transfer_backend == "mooncake" and args.disaggregation_mode != "null":
        problems.append("--disaggregation-transfer-backend mooncake is not available in dsaserve yet: use nixl")
    ib = args.disaggregation_ib_device
    if ib is not None and (ib.lstrip().startswith("{") or "/" in ib or ib.endswith(".json")):
        problems.append(f"--disaggregation-ib-device takes device names (mlx5_0,mlx5_1 or mlx5_0:1), got {ib!r}: "
                        "a per-GPU JSON map or file (SGLang's Mooncake form) is not taken")
    if not 0 < args.disaggregation_bootstrap_port < 65536:
        problems.append(f"--disaggregation-bootstrap-port must be a TCP port, got {args.disaggregation_bootstrap_port}")
    if not 0 < args.disaggregation_timeout_s < math.inf:  # nan passes `<= 0`; inf breaks the deadlines' waits
        problems.append(f"--disaggregation-timeout-s must be > 0 and finite, got {args.disaggregation_timeout_s}")
    return problems
