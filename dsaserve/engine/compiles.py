"""Triton kernel compilations in this process, counted through Triton's cache hook (one call per kernel
specialization that was not in memory yet: a compile, or a load from Triton's disk cache). The warm-up
should leave none for the served requests: EngineStats.kernel_compiles must stay constant once the
server is ready, and each compile after that is logged with the kernel's specialization.

The hook is process-wide (a Triton knob), so the count is too: one counter per process, installed on
first use, chaining any hook that was there before."""
from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger(__name__)


class _CompileHook:
    def __init__(self) -> None:
        self.count = 0
        self.serving = False  # set once a warm-up finished: later compiles made a request wait
        self.installed = False
        self.previous: Callable[..., Any] | None = None

    def install(self) -> None:
        if self.installed:
            return
        self.installed = True
        try:
            from triton import knobs
        except ImportError:  # no Triton (CPU builds): nothing compiles
            return
        self.previous = knobs.runtime.jit_cache_hook
        knobs.runtime.jit_cache_hook = self

    def __call__(self, **kwargs: Any) -> Any:
        self.count += 1
        if self.serving:
            name = getattr(kwargs.get("fn"), "name", None) or str(kwargs.get("repr", "?")).split("[")[0]
            key = " ".join(str(kwargs.get("key", "?")).split())  # the specialization: what the warm-up missed
            log.warning("Triton compiled a kernel after the warm-up (a step waited on it): %s %s", name, key[:3000])
        return self.previous(**kwargs) if self.previous is not None else False


_HOOK = _CompileHook()


def kernel_compiles() -> int:
    """Triton compilations in this process so far (0 without Triton)."""
    _HOOK.install()
    return _HOOK.count


def starting() -> None:
    """An engine is being built: its loads, graph captures and warm-up compile as they must."""
    _HOOK.install()
    _HOOK.serving = False


def warmed_up() -> None:
    """From now on each compile is logged as a stall."""
    _HOOK.install()
    _HOOK.serving = True
