"""Grammars compile beside the step loop. A large JSON schema takes about a second to compile; compiled in the
leader's step loop it stalled every running stream for that long. llguidance releases the GIL while it compiles,
so one thread of the leader compiles while the loop keeps stepping, and a request waits outside the scheduler
until its grammar is ready (as SGLang's grammar queue does). `wake_fd` turns readable when a compile ends, so a
loop blocked on its sockets wakes to admit the request."""
from __future__ import annotations

import concurrent.futures
import socket
from concurrent.futures import Future, ThreadPoolExecutor

from dsaserve.chat.grammar import GrammarState
from dsaserve.engine.request import Request


def compiling(req: Request) -> bool:
    """Whether the request's grammar is still compiling: a PD side keeps it from its first sampling until then."""
    return req.grammar_compile is not None and not req.grammar_compile.done()


def compile_error(req: Request) -> BaseException | None:
    """Why the request's ended compile failed, or None."""
    done = req.grammar_compile is not None and req.grammar_compile.done() and not req.grammar_compile.cancelled()
    return req.grammar_compile.exception() if done else None


class GrammarCompiler:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._pool: ThreadPoolExecutor | None = None  # started on the first grammar (most servers never need it)
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self.held: list[Request] = []  # compiling, not yet given to the scheduler (by arrival)

    @property
    def wake_fd(self) -> int:
        return self._wake_r.fileno()

    def start(self, req: Request) -> None:
        """Compile the request's grammar in the background (req.grammar_compile); grammar_state takes it from there."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        req.grammar_compile = self._pool.submit(GrammarState, req.params.grammar, self.vocab_size)
        req.grammar_compile.add_done_callback(self._wake)

    def hold(self, req: Request) -> None:
        """Keep a started request here until its grammar is ready (ready() hands it back)."""
        self.held.append(req)

    def ready(self) -> list[tuple[Request, BaseException | None]]:
        """The held requests whose compile ended, with its exception or None (their grammar is then set)."""
        if self._pool is None:  # (no grammar yet: nothing to drain, every step of most servers)
            return []
        self._drain()
        out: list[tuple[Request, BaseException | None]] = []
        for req in [r for r in self.held if r.grammar_compile.done()]:  # (one look: a compile may end meanwhile)
            self.held.remove(req)
            exc = compile_error(req)
            if exc is None:
                req.grammar = req.grammar_compile.result()
            out.append((req, exc))
        return out

    def wait(self) -> None:
        """Until some held request's compile ends (a driver with nothing else to do)."""
        if self.held:
            concurrent.futures.wait([r.grammar_compile for r in self.held],
                                    return_when=concurrent.futures.FIRST_COMPLETED)

    def discard(self, req: Request) -> None:
        """A request that ended: forget it (its compile, if running, ends unused)."""
        if req in self.held:
            self.held.remove(req)
        if req.grammar_compile is not None:  # one not started never runs: on the one thread it would delay the
            req.grammar_compile.cancel()  # compiles queued after it (and this process's exit, which waits for them)

    def _wake(self, _: Future) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # (full: the loop wakes anyway; closed: shutting down)
            pass

    def _drain(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
