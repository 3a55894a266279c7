"""Per-layer paged pools: the latent KV cache and the indexer-key cache, sharing page ids."""
from __future__ import annotations

import torch

from dsaserve.config import ModelConfig

Tensor = torch.Tensor


class KVPools:
    """latent[layer]: [slots, kv_lora_rank + rope] and index_keys[layer]: [slots, index_head_dim].

    Slot = page * page_size + offset, the same slot in both pools. Layers that reuse the previous
    layer's top-k (GLM "shared" indexer layers) have no index-key pool.
    """

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device, num_layers: int | None = None):
        self.page_size, self.num_pages = page_size, num_pages
        self.num_slots = num_pages * page_size
        layers = cfg.num_hidden_layers if num_layers is None else num_layers
        full = [i for i in range(layers) if i >= cfg.num_hidden_layers or cfg.indexer_types[i] == "full"]
        # Uninitialised (pages are written before they are read), except the reserved page 0 that
        # masked and dummy rows point at: it must hold finite values.
        self._latent = torch.empty(layers, self.num_slots, cfg.latent_dim, dtype=dtype, device=device)
        self._index = torch.empty(len(full), self.num_slots, cfg.index_head_dim, dtype=dtype, device=device)
        self._latent[:, :page_size].zero_()
        self._index[:, :page_size].zero_()
        self._index_row = {layer: row for row, layer in enumerate(full)}

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, num_layers: int | None = None) -> int:
        layers = cfg.num_hidden_layers if num_layers is None else num_layers
        full = sum(1 for i in range(layers) if i >= cfg.num_hidden_layers or cfg.indexer_types[i] == "full")
        item = torch.empty((), dtype=dtype).element_size()
        return item * (layers * cfg.latent_dim + full * cfg.index_head_dim)

    def latent(self, layer: int) -> Tensor:
        return self._latent[layer]

    def index_keys(self, layer: int) -> Tensor:
        return self._index[self._index_row[layer]]

    def page_buffers(self) -> list[Tensor]:
        """Every cache buffer as raw bytes by page: one uint8 [num_pages, page_bytes] view per layer of each
        pool (latent, then index keys). KV transfer moves pages of these, whatever the cache layout."""
        out = []
        for pool in (self._latent, self._index):
            for layer in pool:
                out.append(layer.view(torch.uint8).view(self.num_pages, -1))
        return out
