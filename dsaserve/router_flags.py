"""`dsaserve router`'s checks of the flags it hands to sglang-router: what would end in a traceback from it is
refused here in one line, a router started without workers is pointed out, and it listens on loopback unless
told otherwise (as `dsaserve serve` does; sglang-router's own default is every interface)."""
from __future__ import annotations

import argparse
import math
from typing import NoReturn
from urllib.parse import urlsplit

LOOPBACK_DEFAULTS = (("--host", "127.0.0.1"), ("--prometheus-host", "127.0.0.1"))


class _Unparsable(Exception):
    """argv that this parser cannot read: sglang-router reports it in its own words."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Unparsable(message)


def _parse(argv: list[str]) -> argparse.Namespace | None:
    p = _Parser(add_help=False)
    for flag in ("--host", "--prometheus-host", "--port", "--prometheus-port", "--request-timeout-secs"):
        p.add_argument(flag)
    p.add_argument("--worker-urls", nargs="*", default=[])
    p.add_argument("--prefill", nargs="+", action="append", default=[])
    p.add_argument("--decode", action="append", default=[])
    for flag in ("--pd-disaggregation", "--service-discovery", "--enable-igw"):
        p.add_argument(flag, action="store_true")
    try:
        return p.parse_known_args(argv)[0]
    except _Unparsable:
        return None


def _port_problem(flag: str, value: str | None) -> str | None:
    try:
        if value is None or 0 < int(value) < 65536:
            return None
    except ValueError:
        pass
    return f"{flag} must be a TCP port (1-65535), got {value!r}"


def http_url_problem(flag: str, url: str) -> str | None:
    """None for an http(s)://host[:port] URL, else a line naming the flag (dsaserve servers speak HTTP)."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number or out of range
        ok = False
    return None if ok else f"{flag} takes http(s)://host:port URLs (dsaserve servers speak HTTP), got {url!r}"


def _asks_for_help(argv: list[str]) -> bool:
    """--help / -h: sglang-router prints its usage and starts nothing, so there is nothing to check or warn about."""
    return "--help" in argv or "-h" in argv


def problems(argv: list[str]) -> list[str]:
    """What is wrong with sglang-router arguments `argv` (only the flags read here; the rest it checks)."""
    ns = None if _asks_for_help(argv) else _parse(argv)
    if ns is None:
        return []
    found = [_port_problem("--port", ns.port), _port_problem("--prometheus-port", ns.prometheus_port)]
    if ns.request_timeout_secs is not None:
        try:
            ok = 0 < float(ns.request_timeout_secs) < math.inf
        except ValueError:
            ok = False
        if not ok:
            found.append(f"--request-timeout-secs must be a positive number, got {ns.request_timeout_secs!r}")
    found += [http_url_problem("--worker-urls", u) for u in ns.worker_urls]
    for prefill in ns.prefill:
        found.append(http_url_problem("--prefill", prefill[0]))
        if len(prefill) > 2:
            found.append(f"--prefill takes a URL and at most a bootstrap port, got {' '.join(prefill)!r}")
        elif len(prefill) == 2 and prefill[1].lower() != "none":
            found.append(_port_problem("--prefill's bootstrap port", prefill[1]))
    found += [http_url_problem("--decode", u) for u in ns.decode]
    if ns.pd_disaggregation and ns.worker_urls:
        found.append("--worker-urls is for plain servers; with --pd-disaggregation give --prefill and --decode")
    if not ns.pd_disaggregation and (ns.prefill or ns.decode):  # sglang-router drops them: a router of no workers
        found.append("--prefill and --decode need --pd-disaggregation (without it sglang-router ignores them)")
    return [f for f in found if f is not None]


def notices(argv: list[str]) -> list[str]:
    """What is legal but likely not meant: a router that starts without its servers (a PD router without its
    prefill or decode servers, a plain one without --worker-urls)."""
    ns = None if _asks_for_help(argv) else _parse(argv)
    if ns is None or ns.service_discovery or ns.enable_igw:
        return []
    if not ns.pd_disaggregation:
        return [] if ns.worker_urls or ns.prefill or ns.decode else [
            "no --worker-urls: the router starts without workers (add servers through its /workers API)"]
    if ns.prefill and ns.decode:
        return []
    return ["--pd-disaggregation without a --prefill or a --decode server: the router starts without it (add "
            "servers through its /workers API)"]


def with_loopback_defaults(argv: list[str]) -> list[str]:
    """--host / --prometheus-host 127.0.0.1 where argv gives none (in front: a flag in argv still wins)."""
    ns = _parse(argv)
    given = {"--host": ns.host, "--prometheus-host": ns.prometheus_host} if ns is not None else {}
    return [item for flag, value in LOOPBACK_DEFAULTS if given.get(flag) is None for item in (flag, value)] + argv


__all__ = ["http_url_problem", "notices", "problems", "with_loopback_defaults"]
