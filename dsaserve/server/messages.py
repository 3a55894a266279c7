"""Messages between the frontend and the DP group leaders (pickled over ZMQ push/pull pairs).

Frontend -> leader: one message per send. Leader -> frontend: a list of events per loop turn, so a
decode step over many requests costs one ZMQ message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsaserve.engine.engine import EngineStats
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
class StatsRequest:
    token: int


@dataclass(frozen=True)
class Shutdown:
    message: str = "the server is shutting down"


# -- leader -> frontend ------------------------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    info: dict[str, Any]  # model_path, context_length, vocab_size, model_type, total_pages, page_size


@dataclass(frozen=True)
class StartupFailed:
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
    token: int
    stats: EngineStats


Event = Ready | StartupFailed | Accepted | Rejected | Stats | RequestOutput
