"""PD disaggregation in the HTTP process: the prefill server's bootstrap server, and the decode server's
lookup of the prefill DP leader that holds a request's room (the router sends the same request, with
bootstrap_host / bootstrap_port / bootstrap_room, to both servers).

A room belongs to prefill DP group room % dp on both sides, so no per-request registration is needed:
the bootstrap server only tells a decode server the prefill server's settings and its leaders' control
ports; the decode server refuses to pair with a prefill server whose settings differ.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import zmq
import zmq.asyncio

from dsaserve.disagg.protocol import BootstrapInfo
from dsaserve.engine.request import DisaggRoute
from dsaserve.server.errors import ApiError
from dsaserve.server_args import ServerArgs

log = logging.getLogger(__name__)
BOOTSTRAP_TIMEOUT_S = 5.0
ONE_COMPLETION = ("PD disaggregation serves one completion per request: n > 1 and several prompts are not supported "
                  "(the router pairs one prefill with one decode per request)")


def local_info(args: ServerArgs, info: dict[str, Any], control_ports: list[int]) -> BootstrapInfo:
    """This server's settings that a PD peer must share; `info` is a leader's (its PD side's under "disagg")."""
    side = info["disagg"]
    return BootstrapInfo(model_type=str(info.get("model_type")), num_hidden_layers=int(info["num_hidden_layers"]),
                         vocab_size=int(info["vocab_size"]), page_size=args.page_size, spec_steps=args.spec_steps,
                         backend=args.disaggregation_transfer_backend, weights=str(side["weights"]),
                         dtype=str(side["dtype"]), cache_format=str(side["cache_format"]),
                         control_ports=tuple(control_ports))


class BootstrapServer:
    """Prefill side: answers `info` on tcp://host:--disaggregation-bootstrap-port."""

    def __init__(self, args: ServerArgs, info: BootstrapInfo):
        self.info = info
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        addr = f"tcp://{args.host}:{args.disaggregation_bootstrap_port}"
        try:
            self.sock.bind(addr)
        except zmq.ZMQError as exc:
            self.ctx.destroy(linger=0)
            raise ValueError(f"the bootstrap server cannot listen on {addr}: {exc} "
                             f"(--disaggregation-bootstrap-port)") from None
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        reply = json.dumps(self.info.to_json()).encode()
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) >= 2 and frames[-1] == b"info":
                await self.sock.send_multipart([frames[0], reply])

    def close(self) -> None:
        self.task.cancel()
        self.ctx.destroy(linger=0)


def refusal_leader(route: DisaggRoute | None, dp_rank: int | None, live_rooms: set[int | None],
                   leaders: int) -> int | None:
    """The DP leader that ends the other server's half of a PD request this server refused (Frontend.refusing):
    None without a route, or while a live request holds its room. A prefill server's room % dp is dp_rank."""
    if route is None or route.room in live_rooms:
        return None
    return dp_rank if dp_rank is not None and 0 <= dp_rank < leaders else 0


class PDRouting:
    """Turns a request's bootstrap fields into its DisaggRoute (and prefill DP group)."""

    def __init__(self, args: ServerArgs, info: dict[str, Any], dp: int):
        self.args, self.dp = args, dp
        self.mine = local_info(args, info, []) if args.disaggregation_mode == "decode" else None
        self.ctx = zmq.asyncio.Context()
        self._cache: dict[tuple[str, int], BootstrapInfo] = {}  # each prefill server's latest answer
        self._lookups: dict[tuple[str, int], asyncio.Future[BootstrapInfo]] = {}  # in flight

    @staticmethod
    def decodes(route: DisaggRoute | None) -> bool:
        """Whether a request with this route is the decode half of a PD pair (its prompt is not run here)."""
        return route is not None and route.prefill_control is not None

    async def route(self, body: Any) -> tuple[DisaggRoute | None, int | None]:
        """(route, DP rank) of a request body (protocol.Bootstrap fields and routed_dp_rank); no route for
        a request without a room or on a null-mode server."""
        host, port, room, dp_rank = body.bootstrap_host, body.bootstrap_port, body.bootstrap_room, body.routed_dp_rank
        if room is None or self.args.disaggregation_mode == "null":
            return None, dp_rank
        if any(isinstance(v, list) for v in (host, port, room)):  # sglang-router's chat with n > 1
            raise ApiError(400, ONE_COMPLETION, param="n")
        if not 0 <= room < 2**63:
            raise ApiError(400, f"bootstrap_room must be in [0, 2^63), got {room}", param="bootstrap_room")
        if self.args.disaggregation_mode == "prefill":  # (check refuses a routed_dp_rank of another group)
            return DisaggRoute(room), room % self.dp
        if host is None or port is None:
            raise ApiError(400, "a request with bootstrap_room needs bootstrap_host and bootstrap_port on a "
                                "decode server", param="bootstrap_host")
        if not 0 < port < 65536:
            raise ApiError(400, f"bootstrap_port must be a TCP port, got {port}", param="bootstrap_port")
        ports = (await self._info(host, port)).control_ports
        return DisaggRoute(room, f"tcp://{_bracket(host)}:{ports[room % len(ports)]}"), dp_rank

    def check(self, body: Any, route: DisaggRoute | None) -> None:
        """Refusals that need the route, inside Frontend.refusing (the other server's half ends too): a decode
        server refuses a prefill server whose settings differ; a prefill server runs a room on DP group
        room % dp, where the decode server sends its page ids, so a routed_dp_rank naming another group is
        refused."""
        if self.decodes(route):
            host, port = body.bootstrap_host, body.bootstrap_port
            problem = self._cache[(host, port)].mismatch(self.mine)  # route() just looked it up
            if problem is not None:
                raise ApiError(500, f"cannot decode for the prefill server at {host}:{port}: {problem}")
            return
        dp_rank = body.routed_dp_rank
        if route is None or dp_rank is None or dp_rank == route.room % self.dp:
            return
        raise ApiError(400, f"bootstrap_room {route.room} belongs to this prefill server's DP group "
                            f"{route.room % self.dp} (room % {self.dp}), where the decode server asks for it; "
                            f"routed_dp_rank {dp_rank} differs", param="routed_dp_rank")

    async def _info(self, host: str, port: int) -> BootstrapInfo:
        """The prefill server's settings and control ports, looked up for every request: a prefill server
        restarted on the same bootstrap port has new control ports, and page ids sent to the old ones were lost
        (both halves failed at their timeouts). Requests that come while a lookup is in flight share it."""
        key = (host, port)
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = self._lookups[key] = asyncio.ensure_future(self._lookup(host, port))
            lookup.add_done_callback(lambda f: self._lookup_done(key, f))
        return await asyncio.shield(lookup)  # (a client that leaves does not cancel the others' lookup)

    def _lookup_done(self, key: tuple[str, int], lookup: asyncio.Future[BootstrapInfo]) -> None:
        self._lookups.pop(key, None)
        if not lookup.cancelled():
            lookup.exception()  # marked retrieved: its requests may all have left (their error is theirs)

    async def _lookup(self, host: str, port: int) -> BootstrapInfo:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            try:
                sock.connect(f"tcp://{_bracket(host)}:{port}")
            except zmq.ZMQError as exc:  # not a host name or address
                raise ApiError(400, f"cannot connect to the bootstrap server at {host}:{port}: {exc}",
                               param="bootstrap_host") from None
            await sock.send_multipart([b"", b"info"])
            if not await sock.poll(int(BOOTSTRAP_TIMEOUT_S * 1000)):
                raise ApiError(503, f"the prefill bootstrap server at {host}:{port} did not answer within "
                                    f"{BOOTSTRAP_TIMEOUT_S:.0f} s")
            frames = await sock.recv_multipart()
            info = BootstrapInfo.from_json(json.loads(frames[-1]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(503, f"the bootstrap server at {host}:{port} sent a bad answer: {exc}") from None
        finally:
            sock.close()
        self._cache[(host, port)] = info
        return info

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def start_bootstrap(args: ServerArgs, frontend: Any) -> BootstrapServer | None:
    """The prefill server's bootstrap server (None in other modes), once every leader reported its port."""
    if args.disaggregation_mode != "prefill":
        return None
    ports = [link.info["disagg"]["control_port"] for link in frontend.links]
    return BootstrapServer(args, local_info(args, frontend.info, ports))
