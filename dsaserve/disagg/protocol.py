"""What prefill and decode servers say to each other, over ZMQ: a JSON header and a binary blob per
message (no pickle between servers).

decode leader -> prefill leader (DEALER -> ROUTER):
  dest    {room, prompt_len, prompt_crc, pages, skip_pages, page_size, spec_steps, weights, timeout_s,
           transport}
          + transport blob
  cancel  {room, reason}
prefill leader -> decode leader:
  done    {room, agent, token, logprob, drafts}   after the pages were written
  failed  {room, message, end, status}   the room's request ended there (end: abort | error; status: the HTTP
          status of an error, a refusal's own), or cannot be handed over
decode frontend -> prefill bootstrap server (DEALER -> ROUTER): info -> BootstrapInfo as JSON.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass
from typing import Any

import zmq


@dataclass(frozen=True)
class BootstrapInfo:
    """What a decode server must agree with before it pairs with a prefill server."""
    model_type: str
    num_hidden_layers: int
    vocab_size: int
    page_size: int
    spec_steps: int
    backend: str
    weights: str  # checkpoint.weights_fingerprint: config.json's settings and a sample of the tensors
    dtype: str  # the computed dtype (FP8 rows look alike whatever computed them)
    cache_format: str  # KVPools.row_format: what a page's bytes mean (--kv-cache-dtype)
    control_ports: tuple[int, ...]  # one per prefill DP group leader; a room goes to room % len

    def mismatch(self, mine: BootstrapInfo) -> str | None:
        """Why a decode server with `mine` cannot take this prefill server's KV cache (None: it can)."""
        names = {"model_type": "model type", "num_hidden_layers": "layers", "vocab_size": "vocabulary size",
                 "page_size": "--page-size", "spec_steps": "speculative draft steps (--speculative-num-steps; "
                 "0: speculative decoding off)", "backend": "--disaggregation-transfer-backend",
                 "weights": "weights fingerprint (both must load the same checkpoint)", "dtype": "--dtype",
                 "cache_format": "KV cache (--kv-cache-dtype)"}
        for field, label in names.items():
            theirs, ours = getattr(self, field), getattr(mine, field)
            if theirs != ours:
                return f"the prefill server's {label} is {theirs}, this decode server's is {ours}"
        return None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> BootstrapInfo:
        return BootstrapInfo(**{**d, "control_ports": tuple(d["control_ports"])})


def prompt_crc(ids: list[int]) -> int:
    """A checksum of the prompt ids: both servers must have tokenized the same prompt."""
    return zlib.crc32(json.dumps(ids).encode())


def room_tag(room: int) -> bytes:
    """The transfer's notification tag; the ';' makes it a prefix of no other room's tag."""
    return f"dsaserve-room:{room};".encode()


def send(sock: zmq.Socket, msg: dict[str, Any], blob: bytes = b"", to: bytes | None = None) -> None:
    frames = ([to] if to is not None else []) + [json.dumps(msg).encode(), blob]
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK)
    except zmq.Again:  # the peer is gone or far behind: the request ends by its timeout
        pass


def recv_all(sock: zmq.Socket, routed: bool) -> list[tuple[bytes | None, dict[str, Any], bytes]]:
    """Every message waiting on `sock`: (sender identity for a ROUTER, header, blob). What is not a JSON object
    naming an integer room is not ours (a stray client, another version): dropped."""
    out = []
    while True:
        try:
            frames = sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return out
        ident = frames[0] if routed else None
        body = frames[1:] if routed else frames
        try:
            msg = json.loads(body[0])
        except (ValueError, IndexError, RecursionError):
            continue  # not ours: ignored
        if isinstance(msg, dict) and type(msg.get("room")) is int:  # (every message names its room)
            out.append((ident, msg, body[1] if len(body) > 1 else b""))
