"""How many pages a request needs to start: the scheduler's admission rule, which the server's checks before
loading (server.preflight) and the memory plan also apply. Torch-free: the server process checks it before it
starts the ranks."""
from __future__ import annotations


def decode_lookahead(spec_steps: int) -> int:
    """Tokens past num_cached that one decode step may write (verify rows and chained drafts)."""
    return 2 * spec_steps if spec_steps else 1


def pages_to_admit(page_size: int, spec_steps: int) -> int:
    """Free pages admitting a request takes: its first chunk's, and the pages held for its first decode. A pool
    of fewer could never start one (the engine refuses it; serve / plan check an explicit --max-total-tokens
    before loading)."""
    return 1 + -(-decode_lookahead(spec_steps) // page_size)
