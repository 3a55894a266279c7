"""Messages between the frontend and the DP group leaders (pickled over ZMQ push/pull pairs).

Frontend -> leader: one `Envelope` per wake-up epoch. Every leader gets every epoch (an empty one
when nothing is addressed to it) so that idle DP-attention leaders wake up together; the epoch
decides when they step again (server.worker). Leader -> frontend: a list of events per loop turn,
so a decode step over many requests costs one ZMQ message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsaserve.engine.stats import EngineStats
from dsaserve.engine.request import DisaggRoute, RequestOutput, SamplingParams


@dataclass(frozen=True)
class Endpoints:
    requests: str  # frontend PUSH binds, leader PULL connects
    outputs: str  # leader PUSH connects, frontend PULL binds


# -- frontend -> leader ------------------------------------------------------------------------

@dataclass(frozen=True)
class AddRequest:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    route: DisaggRoute | None = None  # PD disaggregation: the request's bootstrap room (and prefill leader)


@dataclass(frozen=True)
class AbortRequest:
    rid: str
    message: str


@dataclass(frozen=True)
class RefuseRoom:
    """PD: this server refused a request before its engine took it: the other server's half of the room ends
    now (the leader's side tells it) instead of at its timeout."""
    route: DisaggRoute
    message: str
    status: int  # the refusal's HTTP status and API code, which the other half answers with too
    code: str | None = None


@dataclass(frozen=True)
class FlushCache:
    """Drop every cached prefix that no request holds (/flush_cache)."""


@dataclass(frozen=True)
class Shutdown:
    message: str = "the server is shutting down"


Command = AddRequest | AbortRequest | RefuseRoom | FlushCache | Shutdown


@dataclass(frozen=True)
class Envelope:
    epoch: int  # increases by one per send round; the same on every leader
    commands: list[Command] = field(default_factory=list)


# -- leader -> frontend ------------------------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    info: dict[str, Any]  # model_path, context_length, vocab_size, model_type, total_pages, page_size


SETTING_EXIT = 2  # a rank's exit code when a flag or the checkpoint cannot be served (a follower's report)


@dataclass(frozen=True)
class StartupFailed:
    message: str
    setting: bool = False  # a flag or the checkpoint cannot be served (not a bug): exit 2, no traceback


@dataclass(frozen=True)
class Fatal:
    """The leader's loop failed (e.g. the ranks disagree about a failed step): it exits after this."""
    message: str


@dataclass(frozen=True)
class Accepted:
    rid: str


@dataclass(frozen=True)
class Rejected:
    rid: str
    message: str
    status: int  # 400 bad input, 503 queue full, 500 anything else


@dataclass(frozen=True)
class Stats:
    """Pushed by the leader when its numbers change (and now and then while it steps)."""
    stats: EngineStats


@dataclass(frozen=True)
class Wake:
    """PD: a request's KV cache arrived on this leader; under DP attention every leader must step with it,
    so the frontend sends every leader an envelope (idle leaders wake together)."""


Event = Ready | StartupFailed | Fatal | Accepted | Rejected | Stats | Wake | RequestOutput
