"""The HTTP/1.1 protocol the server runs uvicorn with: httptools' (uvicorn's fastest), less one false alarm.
sglang-router probes each worker it adds for gRPC (HTTP/2's connection preface, once for SGLang's service and
once for vLLM's) beside its HTTP `/health`; uvicorn answered each probe with a 400 and logged "Invalid HTTP
request received." as a WARNING, four at every router start on each server of a PD pair. A connection that
opens with that preface is closed without a word (a debug line): this server speaks HTTP/1.1 only, and the
prober, told nothing, settles on HTTP as before."""
from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n"


class HttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.first_bytes = True
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.first_bytes and data.startswith(HTTP2_PREFACE):
            log.debug("closed a connection from %s that opened with HTTP/2's preface (a gRPC probe?)", self.client)
            self.transport.close()
            return
        self.first_bytes = False
        super().data_received(data)
