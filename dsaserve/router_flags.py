"""`dsaserve router`'s checks of the flags it hands to sglang-router: what would end in a traceback from it or
start a router without workers is refused here in one line, and it listens on loopback unless told otherwise
(as `dsaserve serve` does; sglang-router's own default is every interface)."""
from __future__ import annotations

import argparse
import math
from urllib.parse import urlsplit

LOOPBACK_DEFAULTS = (("--host", "127.0.0.1"), ("--prometheus-host", "127.0.0.1"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--port", type=str)
    p.add_argument("--prometheus-port", type=str)
    p.add_argument("--request-timeout-secs", type=str)
    p.add_argument("--worker-urls", nargs="*", default=[])
    p.add_argument("--prefill", nargs="+", action="append", default=[])
    p.add_argument("--decode", action="append", default=[])
    p.add_argument("--pd-disaggregation", action="store_true")
    p.add_argument("--service-discovery", action="store_true")
    return p


def _port_problem(flag: str, value: str | None) -> str | None:
    if value is None or (value.isdigit() and 0 < int(value) < 65536):
        return None
    return f"{flag} must be a TCP port (1-65535), got {value!r}"


def _url_problem(flag: str, url: str) -> str | None:
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number or out of range
        ok = False
    return None if ok else f"{flag} takes http(s)://host:port URLs, got {url!r}"


def problems(argv: list[str]) -> list[str]:
    """What is wrong with sglang-router arguments `argv` (only the flags checked here; the rest it checks)."""
    ns, _ = _parser().parse_known_args(argv)
    found = [_port_problem("--port", ns.port), _port_problem("--prometheus-port", ns.prometheus_port)]
    if ns.request_timeout_secs is not None:
        try:
            ok = 0 < float(ns.request_timeout_secs) < math.inf
        except ValueError:
            ok = False
        if not ok:
            found.append(f"--request-timeout-secs must be a positive number, got {ns.request_timeout_secs!r}")
    found += [_url_problem("--worker-urls", u) for u in ns.worker_urls]
    for prefill in ns.prefill:
        found.append(_url_problem("--prefill", prefill[0]))
        if len(prefill) > 2:
            found.append(f"--prefill takes a URL and at most a bootstrap port, got {' '.join(prefill)!r}")
        elif len(prefill) == 2 and prefill[1] != "none":
            found.append(_port_problem("--prefill's bootstrap port", prefill[1]))
    found += [_url_problem("--decode", u) for u in ns.decode]
    if ns.pd_disaggregation and not ns.service_discovery:
        if not ns.prefill or not ns.decode:
            found.append("--pd-disaggregation needs at least one --prefill and one --decode server")
        if ns.worker_urls:
            found.append("--worker-urls is for plain servers; with --pd-disaggregation give --prefill and --decode")
    return [f for f in found if f is not None]


def with_loopback_defaults(argv: list[str]) -> list[str]:
    """argv plus --host / --prometheus-host 127.0.0.1 where not given."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return argv + [item for flag, value in LOOPBACK_DEFAULTS if flag not in given for item in (flag, value)]


__all__ = ["problems", "with_loopback_defaults"]
