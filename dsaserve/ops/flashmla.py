"""`--attention-backend flashmla`: FlashMLA's SM90 sparse attention kernels for sparse MLA, Triton for the rest.

FlashMLA (github.com/deepseek-ai/FlashMLA) is optional: its `flash_mla` module must be importable on a Hopper
GPU (benchmarks/build_flashmla.sh) and the model must have its shapes (576 = 512 latent + 64 rope query/key
dims, 512 value dims). `--attention-backend auto` takes it over an FP8 cache where it can run
(model_runner.resolve_attention_backend), the flag over a bf16 cache. Its kernels take 64 or 128 query
heads; DSAOps pads fewer heads (pure TP) to 64 through HEAD_MULTIPLE.

* bf16 cache: the sparse prefill kernel for every step (each query row is one of its s_q rows, the cache
  rows its kv rows, our slot ids its indices).
* FP8 cache (the 656-byte rows of cache/kv_format.py are FlashMLA's layout): the sparse decode kernel
  for every step, each query row one batch entry of one query token, the cache viewed as pages of 64
  rows (a slot id is page * 64 + offset whatever the engine's page size).

Scheduler metadata is made inside every call (no `FlashMLASchedMeta` kept between steps), so it never
describes another step's rows: the stale-metadata failure of DP attention cannot happen here.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch

from dsaserve.ops.triton import indexer_logits, moe_experts, topk_slots

Tensor = torch.Tensor
HEAD_MULTIPLE = 64
HEADS = (64, 128)
QK_DIM, V_DIM = 576, 512
FP8_ROW = 656
VIEW_PAGE = 64  # rows per page of the FP8 cache as the decode kernel sees it
# Query rows per call of the FP8 decode kernel: its scheduler keeps 5 ints per batch entry in one block's shared
# memory (227 KiB on Hopper: at most 11,622 entries; more fail with "invalid argument"), so DSAOps runs longer
# prefill chunks in pieces (max_query_rows).
FP8_MAX_ROWS = 8192


def max_query_rows(kv_cache: Tensor) -> int | None:
    """The most query rows one sparse_mla call over this cache takes (None: any)."""
    return FP8_MAX_ROWS if kv_cache.dtype == torch.uint8 else None


@functools.lru_cache(maxsize=None)
def available(device_index: int = 0) -> str | None:
    """None when the backend can run on this device, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability(device_index)[0] != 9:
        return "FlashMLA's sparse kernels here are built for SM90 (Hopper)"
    try:
        import flash_mla
    except ImportError as exc:
        return f"flash_mla is not importable ({exc}); build it from FlashMLA's source (benchmarks/build_flashmla.sh)"
    return api_problem(flash_mla)


def api_problem(flash_mla: ModuleType) -> str | None:
    """None where the module has the API sparse_mla calls (FlashMLA from 9241ae3 on: flash_mla_sparse_fwd, and
    get_mla_metadata() without arguments, whose FlashMLASchedMeta the first call fills), else why not. An older
    build (V3.2's release: get_mla_metadata takes the lengths) imported and failed at its first step."""
    interface = getattr(flash_mla, "flash_mla_interface", None)
    missing = [name for name, owner in (("flash_mla_sparse_fwd", flash_mla), ("flash_mla_with_kvcache", flash_mla),
                                        ("FlashMLASchedMeta", interface)) if not hasattr(owner, name)]
    if missing:
        return (f"this flash_mla lacks {', '.join(missing)}: it predates the API dsaserve calls; build FlashMLA "
                f"9241ae3 or later (benchmarks/build_flashmla.sh)")
    return None


def topk_multiple(fp8_cache: bool) -> int:
    """index_topk must be a multiple of this: its FP8 decode kernel reads 64 slots a block, its sparse prefill kernel
    (the bf16 cache's) two blocks of 64 at a time (it asserts topk % 128 and takes the process down otherwise)."""
    return 64 if fp8_cache else 128


def unsupported(qk_dim: int, v_dim: int, heads: int, topk: int, fp8_cache: bool) -> str | None:
    """None when a model with these attention shapes can use FlashMLA over this cache, else why not."""
    if (qk_dim, v_dim) != (QK_DIM, V_DIM):
        return f"FlashMLA needs query/key dims {QK_DIM} and value dims {V_DIM}, the model has {qk_dim} and {v_dim}"
    if heads > max(HEADS):
        return f"FlashMLA takes at most {max(HEADS)} query heads, the model has {heads}"
    multiple = topk_multiple(fp8_cache)
    if topk % multiple:
        return (f"FlashMLA needs index_topk to be a multiple of {multiple} over {'an FP8' if fp8_cache else 'a bf16'} "
                f"cache, the model has {topk}" + ("" if fp8_cache else " (--kv-cache-dtype fp8_e4m3 takes multiples "
                                                                       "of 64)"))
    return None


def sparse_mla(q: Tensor, kv_cache: Tensor, indices: Tensor, sm_scale: float, v_dim: int,
               lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """See reference.sparse_mla: [T, H, 576] bf16 queries over their selected slots -> ([T, H, 512], lse).
    The lse is FlashMLA's (its own base and empty-row value), which DSAOps does not use."""
    import flash_mla

    T, H, D = q.shape
    topk = indices.shape[1]
    if H not in HEADS or (D, v_dim) != (QK_DIM, V_DIM) or q.dtype != torch.bfloat16:
        raise ValueError(f"flashmla sparse_mla: needs bf16 queries [T, 64 or 128, {QK_DIM}] and v_dim {V_DIM}, "
                         f"got {list(q.shape)} {q.dtype}, v_dim {v_dim}")
    if T == 0:
        return q.new_empty(0, H, v_dim), q.new_empty(0, H, dtype=torch.float32)
    indices = indices.to(torch.int32)
    if kv_cache.dtype == torch.uint8:  # (its V3.2 decode kernel takes no per-row lengths: -1 slots are skipped)
        slots = kv_cache.shape[0]
        if kv_cache.shape[1] != FP8_ROW or slots % VIEW_PAGE:
            raise ValueError(f"flashmla sparse_mla: the FP8 cache must be [a multiple of {VIEW_PAGE} slots, "
                             f"{FP8_ROW} bytes], got {list(kv_cache.shape)}")
        if T > FP8_MAX_ROWS:
            raise ValueError(f"flashmla sparse_mla: the FP8 decode kernel takes at most {FP8_MAX_ROWS} query rows "
                             f"per call, got {T} (DSAOps.sparse_mla_rows splits them)")
        pages = kv_cache.view(slots // VIEW_PAGE, VIEW_PAGE, 1, FP8_ROW)
        meta, _ = flash_mla.get_mla_metadata()
        out, lse = flash_mla.flash_mla_with_kvcache(
            q.view(T, 1, H, D), pages, None, None, v_dim, meta, softmax_scale=sm_scale, is_fp8_kvcache=True,
            indices=indices.view(T, 1, topk))
        return out.view(T, H, v_dim), lse.view(T, H)
    # The engine puts a row's selected slots first: the prefill kernel stops at min(keys, topk) of them.
    counts = None if lengths is None else lengths.reshape(T).clamp(max=topk).to(torch.int32)
    if kv_cache.dtype != torch.bfloat16:
        raise ValueError(f"flashmla sparse_mla: the cache must be bf16 or FP8 rows, got {kv_cache.dtype}")
    if topk % topk_multiple(fp8_cache=False):  # (its assertion would end the process)
        raise ValueError(f"flashmla sparse_mla: over a bf16 cache top-k must be a multiple of "
                         f"{topk_multiple(fp8_cache=False)}, got {topk}")
    out, _, lse = flash_mla.flash_mla_sparse_fwd(q.contiguous(), kv_cache.view(-1, 1, D), indices.view(T, 1, topk),
                                                 sm_scale, v_dim, topk_length=counts)
    return out, lse


__all__ = ["HEAD_MULTIPLE", "available", "indexer_logits", "max_query_rows", "moe_experts", "sparse_mla",
           "topk_multiple", "topk_slots", "unsupported"]
