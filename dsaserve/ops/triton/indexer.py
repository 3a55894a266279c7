"""Lightning-indexer logits and top-k slot selection.

indexer_logits: a program owns ROWS consecutive query rows and a chunk of `iters` key blocks. Each key
block (BLOCK_N keys, gathered through the page table) is loaded once and multiplied against every head of
every row in the program at once (M = keys, N = rows x heads), then relu, head weights and the head sum are
applied in registers, so no [T, H, L] intermediate ever reaches memory. Rows are grouped by request
(row_req non-decreasing), so in prefill a block of rows shares its keys; a block that straddles requests
runs one pass per request, storing only that request's rows. Decode uses one row per program, an MTP verify
step a request's S + 1 rows (its keys read once for them all).
FP8 index keys (uint8 rows: 128 e4m3 values + one fp32 scale, cache/kv_format.py) are converted to the
query's dtype after the gather (exact) and the key's scale multiplies its logit after the head sum: the
scale is positive, so relu(s * q.k) = s * relu(q.k).

topk_slots (selection_path): few long rows (decode at long context) spread each row over many programs in four
launches (topk_split.py); other rows of at most 4K keys, and up to 64 rows of 8K, select in one launch with the
row in registers (topk.py); the rest, many wide rows (prefill chunks, large decode batches at long context), one
program per row that reads the row twice (topk_sampled.py). All map positions straight to cache slots. Rows
that see <= topk keys skip the selection and take their first kv_len positions, so the valid slots come first
and the selected set equals the reference's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsaserve.cache.kv_format import fp8_views
from dsaserve.ops.triton import topk as row_topk, topk_sampled, topk_split
from dsaserve.ops.triton._common import dot_precision, new_empty, next_pow2, pdl, pdl_start, sm_count

Tensor = torch.Tensor

# Tuning override for benchmarks: dict with any of block_t, block_n, num_warps, num_stages, iters.
CONFIG: dict[str, int] | None = None


@triton.jit(do_not_specialize=["stride_pt", "stride_ot", "T", "num_keys", "iters"])
def _indexer_kernel(Q, W, KC, KS, PT, REQ, LEN, OUT,
                    stride_qt, stride_qh, stride_wt, stride_kc, stride_ks, stride_pt, stride_len, stride_ot,
                    T, HI, DI, num_keys, page_size, iters,
                    ROWS: tl.constexpr, BLOCK_T: tl.constexpr, HP: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    dtype = Q.dtype.element_ty if FP8 else KC.dtype.element_ty
    t0 = tl.program_id(0) * ROWS  # a program's ROWS rows in a tile of BLOCK_T (a power of two >= ROWS)
    chunk = tl.program_id(1)
    # Queries as the N operand [BLOCK_D, BLOCK_T * HP], column j = (row j // HP, head j % HP).
    j = tl.arange(0, BLOCK_T * HP)
    j_row = t0 + j // HP
    j_head = j % HP
    j_mask = (j // HP < ROWS) & (j_row < T) & (j_head < HI)
    rows = t0 + tl.arange(0, BLOCK_T)
    r_mask = (tl.arange(0, BLOCK_T) < ROWS) & (rows < T)
    reqs = tl.load(REQ + rows, mask=r_mask, other=-1)
    lens = tl.minimum(tl.load(LEN + rows * stride_len, mask=r_mask, other=0), num_keys)
    out_rows = OUT + rows.to(tl.int64)[None, :] * stride_ot
    n = tl.arange(0, BLOCK_N)
    chunk_start = chunk * BLOCK_N * iters
    chunk_end = tl.minimum(chunk_start + BLOCK_N * iters, num_keys)
    # A chunk past every row's keys only writes -inf: it reads no queries (under graphs the key width is a
    # power-of-two bucket, so up to half of a decode row's programs are such chunks).
    live = chunk_start < tl.max(lens, 0)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < DI
    q_t = tl.load(Q + j_row.to(tl.int64)[None, :] * stride_qt + j_head[None, :] * stride_qh + d[:, None],
                  mask=j_mask[None, :] & d_mask[:, None] & live, other=0.0).to(dtype)
    w = tl.load(W + j_row.to(tl.int64) * stride_wt + j_head, mask=j_mask & live, other=0.0)  # 0 for padded heads

    for i in tl.static_range(ROWS):
        row_i = tl.minimum(t0 + i, T - 1)
        req_i = tl.load(REQ + row_i)
        if i == 0:
            first = t0 + i < T
        else:
            first = (t0 + i < T) & (req_i != tl.load(REQ + tl.maximum(row_i - 1, 0)))
        if first:  # one pass per distinct request among the block's rows
            sel = r_mask & (reqs == req_i)
            len_max = tl.max(tl.where(sel, lens, 0), 0)
            comp_end = tl.minimum(chunk_end, len_max)
            pt_row = PT + req_i.to(tl.int64) * stride_pt
            for n0 in range(chunk_start, comp_end, BLOCK_N):
                pos = n0 + n
                k_mask = pos < len_max
                page = tl.load(pt_row + pos // page_size, mask=k_mask, other=0)
                slot = page.to(tl.int64) * page_size + pos % page_size
                k = tl.load(KC + slot[:, None] * stride_kc + d[None, :], mask=k_mask[:, None] & d_mask[None, :],
                            other=0.0)
                if FP8:
                    k = k.to(dtype)
                s = tl.dot(k, q_t, input_precision=PRECISION)  # [BLOCK_N, BLOCK_T * HP]
                s = tl.maximum(s, 0.0) * w[None, :]
                if BLOCK_T == 1:
                    logit = tl.sum(s, 1)[:, None]
                else:
                    logit = tl.sum(tl.reshape(s, [BLOCK_N, BLOCK_T, HP]), 2)
                if FP8:
                    logit = logit * tl.load(KS + slot * stride_ks, mask=k_mask, other=0.0)[:, None]
                logit = tl.where(pos[:, None] < lens[None, :], logit, float("-inf"))
                tl.store(out_rows + pos[:, None], logit, mask=sel[None, :] & (pos[:, None] < num_keys))
            # Key blocks past every selected row's kv_len: only -inf to write, no keys to read.
            fill_start = chunk_start + tl.cdiv(tl.maximum(comp_end - chunk_start, 0), BLOCK_N) * BLOCK_N
            neg = tl.full([BLOCK_N, BLOCK_T], float("-inf"), tl.float32)
            for n0 in range(fill_start, chunk_end, BLOCK_N):
                pos = n0 + n
                tl.store(out_rows + pos[:, None], neg, mask=sel[None, :] & (pos[:, None] < chunk_end))


@triton.jit(do_not_specialize=["stride_pos", "stride_pt", "L"])
def _slots_kernel(POS, LEN, PT, REQ, OUT, stride_pos, stride_len, stride_pt, stride_ot,
                  L, topk, page_size, HAS_POS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j_mask = j < topk
    kv_len = tl.minimum(tl.load(LEN + t * stride_len), L)
    req = tl.load(REQ + t)
    if HAS_POS:  # rows with more than topk keys take the top-k positions, the others their first kv_len
        p = tl.load(POS + t * stride_pos + j, mask=j_mask & (kv_len > topk), other=0).to(tl.int32)
        p = tl.where(kv_len > topk, p, j)
    else:
        p = j
    slot = row_topk.position_slots(PT + req.to(tl.int64) * stride_pt, p, page_size, j_mask & (j < kv_len))
    tl.store(OUT + t * stride_ot + j, slot.to(tl.int32), mask=j_mask)


def _config(T: int, num_keys: int, hp: int, sms: int, group: int = 1) -> dict[str, int]:
    """rows: query rows per program, which share each key block they read; group: the rows of one request
    that sit together (an MTP verify step's S + 1), a hint for decode-sized steps."""
    cfg = dict(CONFIG or {})
    decode = T <= 256  # one row per program (16 / hp when heads are few); prefill rows share key blocks
    # Prefill: 256 (row, head) columns per key block (at most 8 rows: the pass per request is unrolled by row).
    # Each key block read from L2 serves that many rows; with 2 rows per block the key reads, not the tensor
    # cores, set the pace (H200 sweep, docs/benchmarks.md: 4 rows of 64 heads, 4 warps, 2 stages was 22-28%
    # faster than 2 rows, 4 stages over bf16 keys and 21-62% over FP8 keys, 512 to 32K keys).
    # Decode: a verify step's S + 1 rows of a request in one program read its keys once, not S + 1 times.
    rows = cfg.get("block_t") or (min(group, max(1, 256 // hp)) if decode else max(1, min(8, 256 // hp)))
    if next_pow2(rows, 1) * hp < 16:  # the dot needs N >= 16: few heads take more rows
        rows = triton.cdiv(16, hp)
    # A verify step's rows: 128-key blocks (H100, 1-16 requests x 2-4 rows x 32K keys: 5-32% less time than one
    # row per program; with 64-key blocks one request's 4 rows took 19% more, docs/benchmarks.md).
    block_n = cfg.get("block_n") or (128 if decode and rows > 1 and hp * rows >= 128 else 64)
    if decode:
        # Under graphs the key width is a power-of-two bucket: the longest row ends in (num_keys / 2,
        # num_keys], and programs past a row's end only write -inf. Taking half the width as live, the
        # longest key range per program that leaves ~3.5 working programs per SM, 2 stages: in an H200
        # sweep of 1-64 rows over 4K and 32K keys (docs/benchmarks.md) 787 us over 20 cases against 845
        # for 15-16 blocks per program and 767 for each case's best config.
        working = triton.cdiv(T, rows) * num_keys / 2 / block_n
        iters = next((i for i in (16, 8, 4, 2) if working / i >= 3.5 * sms), 1)
        stages = 2
    else:
        blocks = triton.cdiv(T, rows) * triton.cdiv(num_keys, block_n)
        iters = max(1, min(16, blocks // (4 * sms)))  # reuse q over keys, keep SMs full
        stages = 2
    return dict(rows=rows, block_n=block_n, iters=cfg.get("iters") or iters,
                num_warps=cfg.get("num_warps") or 4, num_stages=cfg.get("num_stages") or stages)


def indexer_logits(q: Tensor, weights: Tensor, k_cache: Tensor, page_table: Tensor, row_req: Tensor,
                   row_kv_len: Tensor, page_size: int, num_keys: int, rows_per_request: int = 1) -> Tensor:
    """See reference.indexer_logits (k_cache: [S, Di] rows, or uint8 FP8 rows with Di <= 128: one scale).
    rows_per_request: how many consecutive rows each request has where a step gives them all the same count
    (MTP verify: S + 1), a tiling hint: any value gives right logits (equal within rounding: the head sum is
    tiled differently)."""
    T, HI, DI = q.shape
    logits = new_empty((T, num_keys), torch.float32, q.device)
    if T == 0 or num_keys == 0:
        return logits
    if q.stride(2) != 1:
        q = q.contiguous()
    weights = weights.float()
    if weights.stride(1) != 1:
        weights = weights.contiguous()
    fp8 = k_cache.dtype == torch.uint8
    if fp8:
        if DI > 128 or q.dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"indexer_logits over FP8 keys needs head_dim <= 128 (one scale per key) and bf16 "
                             f"or fp32 queries, got head_dim {DI}, {q.dtype}")
        keys, scales, _ = fp8_views(k_cache, DI, 0)  # typed views of the same rows: no copy
    else:
        keys = scales = k_cache.contiguous()
    page_table = page_table.to(torch.int32)
    row_req = row_req.to(torch.int32).contiguous()
    row_kv_len = row_kv_len.to(torch.int32).reshape(T, -1)
    hp = next_pow2(HI, 1)
    block_d = next_pow2(DI)
    cfg = _config(T, num_keys, hp, sm_count(q), rows_per_request)
    grid = (triton.cdiv(T, cfg["rows"]), triton.cdiv(num_keys, cfg["block_n"] * cfg["iters"]))
    _indexer_kernel[grid](
        q, weights, keys, scales, page_table, row_req, row_kv_len, logits,
        q.stride(0), q.stride(1), weights.stride(0), keys.stride(0), scales.stride(0), page_table.stride(0),
        row_kv_len.stride(0), logits.stride(0),
        T, HI, DI, num_keys, page_size, cfg["iters"],
        ROWS=cfg["rows"], BLOCK_T=next_pow2(cfg["rows"], 1), HP=hp, BLOCK_D=block_d, BLOCK_N=cfg["block_n"],
        PRECISION=dot_precision(q.dtype if fp8 else keys.dtype), FP8=fp8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl(q))
    return logits


def topk_slots(logits: Tensor, row_kv_len: Tensor, page_table: Tensor, row_req: Tensor, page_size: int,
               topk: int) -> Tensor:
    """See reference.topk_slots (valid slots first, then -1; order among the valid ones unspecified)."""
    path = selection_path(*logits.shape, topk)
    select = {"split": topk_split.split_topk_slots, "row kernel": row_topk.row_topk_slots,
              "sampled": topk_sampled.sampled_topk_slots, "torch.topk": torch_topk_slots}[path]
    return select(logits, row_kv_len, page_table, row_req, page_size, topk)


def selection_path(rows: int, num_keys: int, topk: int) -> str:
    """Which kernel selects `rows` rows of `num_keys` logits: the fastest measured there (H200,
    docs/benchmarks.md): few long rows the split path, narrow ones the row kernel, other wide ones the sampled
    kernel."""
    if num_keys <= topk:
        return "torch.topk"  # every row keeps its first positions: torch_topk_slots runs the slot kernel alone
    if topk_split.fits(rows, num_keys):
        return "split"
    if row_topk.fits(rows, num_keys):
        return "row kernel"
    return "sampled" if topk_sampled.fits(topk) else "torch.topk"  # k > 8192: no model has that many


def selection_widths(topk: int, max_keys: int) -> list[int]:
    """Key widths whose rows select on every width variant topk_slots compiles for rows of up to max_keys keys:
    each power of two past topk up to twice the row kernel's widest tier (its variants are per power of two; the
    split path has none), and one past the sampled kernel's WIDE_ROWS (its wider sample) when max_keys is. Eager
    steps are as wide as their longest row, so without graphs these widths are what a warm-up must run."""
    widths, width = [], 1 << topk.bit_length()  # the first power of two above topk
    while width <= min(2 * row_topk.ROW_LIMIT, next_pow2(max_keys)):
        widths.append(width)
        width *= 2
    if max_keys > topk_sampled.WIDE_ROWS and topk_sampled.WIDE_ROWS > topk:
        widths.append(topk_sampled.WIDE_ROWS + 1)
    return widths


def selection_shapes(topk: int, max_keys: int) -> list[tuple[int, int]]:
    """(rows, key width) pairs whose selections compile every kernel variant topk_slots uses for rows of up to
    max_keys keys: each of selection_widths at one row and where the path or the split path's rank block
    changes with the row count."""
    most_row_kernel_rows = max(n for n in row_topk.MOST_ROWS.values() if n is not None)
    rows = sorted({1, topk_split.FEW_ROWS + 1, max(topk_split.MOST_ROWS.values()) + 1, most_row_kernel_rows + 1})
    return [(r, width) for width in selection_widths(topk, max_keys) for r in rows]


def warm_selection(device: torch.device, topk: int, page_size: int, max_keys: int) -> None:
    """Compile every selection variant a server of this context can take (selection_shapes) on dummy logits
    (equal keys: the split path's passes share its ranking kernel), so that no step waits on a compile: some
    row counts never occur in the warm-up's steps (the graphs' batch buckets, eager steps at batch 1)."""
    for rows, width in selection_shapes(topk, max_keys):
        logits = torch.zeros(rows, width, device=device)
        kv_len = torch.full((rows, 1), width, dtype=torch.int32, device=device)
        page_table = torch.zeros(1, -(-width // page_size), dtype=torch.int32, device=device)
        topk_slots(logits, kv_len, page_table, torch.zeros(rows, dtype=torch.int32, device=device), page_size, topk)


def torch_topk_slots(logits: Tensor, row_kv_len: Tensor, page_table: Tensor, row_req: Tensor, page_size: int,
                     topk: int) -> Tensor:
    """topk_slots through torch.topk, for rows of any width."""
    T, L = logits.shape
    out = new_empty((T, topk), torch.int32, logits.device)
    if T == 0 or topk == 0:
        return out
    row_kv_len, page_table, row_req = row_topk.slot_inputs(T, row_kv_len, page_table, row_req)
    has_pos = L > topk  # else every row keeps its first min(kv_len, L) positions
    pos = torch.topk(logits, topk, dim=-1, sorted=False).indices if has_pos else out
    block = min(1024, next_pow2(topk))
    _slots_kernel[(T, triton.cdiv(topk, block))](
        pos, row_kv_len, page_table, row_req, out, pos.stride(0), row_kv_len.stride(0), page_table.stride(0),
        out.stride(0), L, topk, page_size, HAS_POS=has_pos, BLOCK=block, num_warps=4, **pdl(pos))
    return out


def flops(T: int, HI: int, DI: int, L: int) -> float:
    return 2.0 * T * HI * DI * L


def min_bytes(T: int, HI: int, DI: int, L: int, distinct_requests: int, elem: int = 2,
              key_bytes: int | None = None) -> float:
    """Keys once per request (key_bytes each: DI * elem unless FP8), queries and weights, the logits written once."""
    key = DI * elem if key_bytes is None else key_bytes
    return float(distinct_requests * L * key + T * HI * (DI * elem + 4) + T * L * 4)


__all__ = ["CONFIG", "flops", "indexer_logits", "min_bytes", "selection_shapes", "selection_widths", "topk_slots",
           "torch_topk_slots", "warm_selection"]
