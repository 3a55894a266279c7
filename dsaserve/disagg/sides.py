"""The engine's side of PD disaggregation, on each DP group leader: create_side() builds the prefill or the
decode side, with its transfer backend over the leader's KV pools and its ZMQ control socket.

The engine calls (leader only): add(req) for a request that carries a route, after_step(accepted) after a
step's tokens are committed, poll() before every step (and from the server's loop between steps),
release(req, reason) when a PD request ends outside the side's hand-over (aborted, a failed step); the
server's loop waits on sockets() for at most wait_ms(); info() goes to the frontend.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from dsaserve.disagg.transport import KVTransport, create_transport
from dsaserve.model.checkpoint import weights_fingerprint

if TYPE_CHECKING:
    from dsaserve.engine.engine import Engine

FAILURE_PROB_ENV = "DSASERVE_DISAGG_TEST_FAILURE_PROB"


@dataclass
class Deadlines:
    """Monotonic deadlines of a side's waits (every wait is bounded)."""
    timeout_s: float
    clock: Any = time.monotonic

    def after(self, fraction: float = 1.0) -> float:
        return self.clock() + self.timeout_s * fraction

    def passed(self, deadline: float) -> bool:
        return self.clock() >= deadline

    def ms_until(self, deadline: float | None) -> int | None:
        return None if deadline is None else max(1, int((deadline - self.clock()) * 1000) + 1)


@dataclass
class SideBase:
    engine: Engine
    transport: KVTransport
    ctx: zmq.Context
    deadlines: Deadlines
    weights_id: str = ""  # checkpoint.weights_fingerprint: both halves of a room must have loaded the same model
    failure_prob: float = 0.0
    rng: random.Random = field(default_factory=random.Random)  # draws the injected failures

    @property
    def page_size(self) -> int:
        return self.engine.args.page_size

    def info(self) -> dict[str, Any]:
        """For the frontend: the settings a PD peer must share (protocol.BootstrapInfo), checked when a decode
        server looks its prefill server up, before either holds pages or runs the prompt for a request."""
        return {"weights": self.weights_id, "dtype": str(self.engine.runner.dtype).removeprefix("torch."),
                "cache_format": self.transport.cache_format}

    def close(self) -> None:
        self.transport.close()
        self.ctx.destroy(linger=0)


def failure_prob() -> float:
    raw = os.environ.get(FAILURE_PROB_ENV, "0")
    try:
        p = float(raw)
    except ValueError:
        raise ValueError(f"{FAILURE_PROB_ENV} must be a probability, got {raw!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{FAILURE_PROB_ENV} must be in [0, 1], got {p}")
    return p


def create_side(engine: Engine) -> Any:
    from dsaserve.disagg.decode import DecodeSide
    from dsaserve.disagg.prefill import PrefillSide
    args = engine.args
    prob = failure_prob()  # before anything that would need closing
    weights_id = weights_fingerprint(engine.model_path, args.load_format, args.model_overrides)
    pools = engine.runner.pools
    transport = create_transport(args.disaggregation_transfer_backend, pools.page_buffers(), pools.row_format,
                                 args.disaggregation_ib_device)
    base = dict(engine=engine, transport=transport, ctx=zmq.Context(),
                deadlines=Deadlines(args.disaggregation_timeout_s), failure_prob=prob,
                weights_id=weights_id,
                rng=random.Random(args.seed * 1009 + engine.par.cfg.dp_rank))  # injected failures repeat with --seed
    return PrefillSide(**base) if args.disaggregation_mode == "prefill" else DecodeSide(**base)
