"""Per-layer paged pools: the latent KV cache and the indexer-key cache, sharing page ids.

The pools own the cache dtype and row layout (cache/kv_format.py): the model writes through
`write_latent` / `write_index_keys`, the attention ops read the rows they select.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsaserve.cache import kv_format
from dsaserve.config import ModelConfig
from dsaserve.ops.fused import rms_norm, rope_, rope_index_
from dsaserve.server_args import KV_CACHE_DTYPE_NAMES

Tensor = torch.Tensor
# --kv-cache-dtype names -> cache dtype; None: the model's compute dtype.
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = dict(zip(KV_CACHE_DTYPE_NAMES, (None, torch.bfloat16, torch.bfloat16,
                                                                                 kv_format.FP8), strict=True))


def resolve_kv_cache_dtype(name: str, compute: torch.dtype) -> torch.dtype:
    """The cache dtype for --kv-cache-dtype `name` (kv_format.FP8 stands for the FP8 row layout)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return KV_CACHE_DTYPES[name] or compute


@dataclass(frozen=True)
class LatentPrologue:
    """What a latent write applies first: the latent's RMSNorm (weight, eps) and k_pe's interleaved rotary
    (cos / sin [T, rope / 2] of each row's position)."""
    norm_weight: Tensor
    eps: float
    cos: Tensor
    sin: Tensor


@dataclass(frozen=True)
class IndexKeyPrologue:
    """What an index-key write applies first: the key's LayerNorm (weight, bias, eps) and the indexer's rotary
    of its first rope_dims values (cos / sin [T, rope_dims / 2]); an FP8 cache then rotates the whole row."""
    weight: Tensor
    bias: Tensor
    eps: float
    cos: Tensor
    sin: Tensor
    rope_dims: int
    interleaved: bool


def _kernels():  # imported lazily: needs CUDA + Triton
    from dsaserve.ops.triton import kv_write
    return kv_write


def _full_indexer_layers(cfg: ModelConfig, layers: int) -> list[int]:
    return [i for i in range(layers) if i >= cfg.num_hidden_layers or cfg.indexer_types[i] == "full"]


class KVPools:
    """latent[layer]: [slots, latent row] and index_keys[layer]: [slots, index-key row].

    Rows are kv_lora_rank + rope values (index keys: index_head_dim) in `dtype`, or with
    dtype=kv_format.FP8 uint8 rows in the FP8 layout (656 and 144 bytes at DeepSeek-V3.2's sizes).
    Slot = page * page_size + offset, the same slot in both pools. Layers that reuse the previous
    layer's top-k (GLM "shared" indexer layers) have no index-key pool. `num_layers` counts the
    MTP layer's caches too when it drafts.
    """

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device, num_layers: int | None = None):
        self.dtype = dtype
        self.fp8 = dtype == kv_format.FP8
        self.page_size, self.num_pages = page_size, num_pages
        self.num_slots = num_pages * page_size
        layers = cfg.num_hidden_layers if num_layers is None else num_layers
        full = _full_indexer_layers(cfg, layers)
        rope = cfg.qk_rope_head_dim
        if self.fp8:
            kv_format.check_fp8_dims(cfg.kv_lora_rank, rope)
            kv_format.check_fp8_dims(cfg.index_head_dim, 0)
            if cfg.index_head_dim & (cfg.index_head_dim - 1):
                raise ValueError(f"an FP8 index-key cache is Hadamard-rotated, which needs a power-of-two "
                                 f"index_head_dim, got {cfg.index_head_dim}")
        latent_row = kv_format.row_bytes(cfg.kv_lora_rank, rope, dtype) if self.fp8 else cfg.latent_dim
        index_row = kv_format.row_bytes(cfg.index_head_dim, 0, dtype) if self.fp8 else cfg.index_head_dim
        store = kv_format.storage_dtype(dtype)
        # Plain rows start uninitialised (written before they are read) except the reserved page 0 that
        # masked and dummy rows point at: it must hold finite values (all-zero bytes are 0.0 in every
        # format). FP8 rows start zeroed: the writers never touch a row's padding bytes (one memset).
        alloc = torch.zeros if self.fp8 else torch.empty
        self._latent = alloc(layers, self.num_slots, latent_row, dtype=store, device=device)
        self._index = alloc(len(full), self.num_slots, index_row, dtype=store, device=device)
        if not self.fp8:
            self._latent[:, :page_size].zero_()
            self._index[:, :page_size].zero_()
        self._index_row = {layer: row for row, layer in enumerate(full)}

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, num_layers: int | None = None) -> int:
        """Cache bytes of one token over every layer: what the pool allocates per slot."""
        layers = cfg.num_hidden_layers if num_layers is None else num_layers
        full = len(_full_indexer_layers(cfg, layers))
        return (layers * kv_format.row_bytes(cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype)
                + full * kv_format.row_bytes(cfg.index_head_dim, 0, dtype))

    @property
    def rotates_index_keys(self) -> bool:
        """FP8 index keys are stored Hadamard-rotated (kv_format): the indexer rotates its keys and queries."""
        return self.fp8

    @property
    def row_format(self) -> str:
        """What the rows' bytes mean, which a PD peer must share (bf16 and fp16 rows have equal sizes)."""
        if self.fp8:
            return "fp8_e4m3 rows with Hadamard-rotated index keys"
        return f"{str(self.dtype).removeprefix('torch.')} rows"

    def latent(self, layer: int) -> Tensor:
        return self._latent[layer]

    def has_index_keys(self, layer: int) -> bool:
        """False for a layer that reuses the previous layer's top-k (GLM's shared-indexer layers)."""
        return layer in self._index_row

    def index_keys(self, layer: int) -> Tensor:
        return self._index[self._index_row[layer]]

    def write_latent(self, layer: int, slots: Tensor, latent: Tensor, k_pe: Tensor,
                     prologue: LatentPrologue | None = None) -> None:
        """Cache the latent [T, kv_lora_rank] and k_pe [T, rope] of T tokens at `slots`: as given, or RMS-normed
        and rotated first by `prologue` (on CUDA inside the write: one launch instead of three)."""
        cache = self._latent[layer]
        if prologue is not None and not (cache.is_cuda and _kernels().prologue_applies(latent, k_pe, prologue)):
            # the prologue's own ops (the reference math on CPU)
            latent = rms_norm(latent, prologue.norm_weight, prologue.eps)
            k_pe = rope_(k_pe, prologue.cos, prologue.sin, True, out=torch.empty_like(k_pe))
            prologue = None
        if self.fp8:
            self._write_fp8(cache, slots, latent, k_pe, prologue)
        elif cache.is_cuda:  # one kernel instead of four
            _kernels().write_rows(cache, slots, latent, k_pe, prologue)
        else:
            cache[slots.long()] = torch.cat([latent, k_pe], -1).to(cache.dtype)

    def write_index_keys(self, layer: int, slots: Tensor, keys: Tensor,
                         prologue: IndexKeyPrologue | None = None) -> None:
        """Cache the index keys [T, index_head_dim] of T tokens: as given (Hadamard-rotated already when
        rotates_index_keys), or the raw keys after `prologue` (on CUDA one launch, `keys` its scratch)."""
        cache = self.index_keys(layer)
        if prologue is not None:
            if cache.is_cuda and _kernels().index_prologue_applies(keys, prologue):
                _kernels().write_index_keys(cache, slots, keys, prologue)
                return
            p = prologue  # the prologue's own ops (the reference math on CPU)
            keys = F.layer_norm(keys, (keys.shape[-1],), p.weight, p.bias, p.eps)
            keys = rope_index_(keys, p.rope_dims, p.cos, p.sin, p.interleaved, self.rotates_index_keys)
        if self.fp8:
            self._write_fp8(cache, slots, keys, None)
        elif cache.is_cuda:
            _kernels().write_rows(cache, slots, keys)
        else:
            cache[slots.long()] = keys.to(cache.dtype)

    @staticmethod
    def _write_fp8(cache: Tensor, slots: Tensor, x: Tensor, rope: Tensor | None,
                   prologue: LatentPrologue | None = None) -> None:
        if cache.is_cuda:  # one fused kernel instead of ~15 small ones per layer (same bytes)
            _kernels().write_fp8_rows(cache, slots, x, rope, prologue)
        else:
            cache[slots.long()] = kv_format.quantize_fp8(x, rope)

    def query_dtype(self, compute: torch.dtype) -> torch.dtype:
        """The dtype attention queries take: the cache's, or over an FP8 cache the compute dtype (bf16 for
        fp16: the power-of-two scales can leave fp16's range, while e4m3 x scale is exact in bf16)."""
        if not self.fp8:
            return self.dtype
        return torch.bfloat16 if compute == torch.float16 else compute

    def copy_pages_from_leader(self, pages: list[int], broadcast: Callable[[Tensor], Tensor]) -> None:
        """Give the attention group's other ranks the leader's content of `pages` (every layer of both
        pools, one collective): a prefill server wrote them into the leader's pool only."""
        index = torch.tensor(pages, dtype=torch.long, device=self._latent[0].device)
        buffers = self.page_buffers()
        rows = broadcast(torch.cat([b.index_select(0, index) for b in buffers], dim=1))
        start = 0
        for b in buffers:
            b.index_copy_(0, index, rows[:, start:start + b.shape[1]])
            start += b.shape[1]

    def page_buffers(self) -> list[Tensor]:
        """Every cache buffer as raw bytes by page: one uint8 [num_pages, page_bytes] view per layer of each
        pool (latent, then index keys). KV transfer moves pages of these, whatever the cache layout."""
        out = []
        for pool in (self._latent, self._index):
            for layer in pool:
                out.append(layer.view(torch.uint8).view(self.num_pages, -1))
        return out
