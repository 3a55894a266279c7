"""JSON-schema string formats as regexes of the whole value, for strings a tool-call format writes raw (GLM's
`<arg_value>`): llguidance checks `format` inside JSON strings only. The formats are those llguidance's JSON
grammar knows, so that a forced call checks the same formats in either chat format; each regex follows its RFC's
grammar (dates and times RFC 3339, IP addresses RFC 2673 / 4291, hostnames RFC 1123, URIs RFC 3986 by character
set) without the checks a regex cannot make (February 29 of a common year, a hostname's 253-byte bound). An IPv6
address may end in an IPv4 one (::ffff:1.2.3.4), as RFC 4291 writes it (llguidance's JSON grammar refuses that)."""
from __future__ import annotations

from dsaserve.chat.grammar import GrammarError

_DATE = ("[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         "|02-(?:0[1-9]|1[0-9]|2[0-9]))")  # (February 29 in any year: a regex does not count leap years)
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = f"{_OCTET}(?:\\.{_OCTET}){{3}}"
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = f"{_LABEL}(?:\\.{_LABEL})*"
_ATOM = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_HEX = "[0-9A-Fa-f]"
_CLOCK = "T(?:[0-9]+H(?:[0-9]+M)?(?:[0-9]+S)?|[0-9]+M(?:[0-9]+S)?|[0-9]+S)"  # at least one part after T


def _ipv6() -> str:
    """RFC 4291's text forms as RFC 3986's IPv6address writes them: eight groups, or k groups after one `::` and
    at most 7 - k before it, the last two groups possibly an IPv4 address (ls32)."""
    h16, ls32 = f"{_HEX}{{1,4}}", f"(?:{_HEX}{{1,4}}:{_HEX}{{1,4}}|{_IPV4})"
    forms = [f"(?:{h16}:){{6}}{ls32}"]
    for k in range(1, 9):  # the k-th form after the first: fewer groups after `::`, more allowed before it
        before = "" if k == 1 else f"(?:(?:{h16}:){{0,{k - 2}}}{h16})?"
        after = f"(?:{h16}:){{{6 - k}}}{ls32}" if k < 6 else {6: ls32, 7: h16, 8: ""}[k]
        forms.append(f"{before}::{after}")
    return "(?:" + "|".join(forms) + ")"


FORMAT_REGEX = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f"{_DATE}[Tt]{_TIME}",
    "duration": f"P(?:[0-9]+W|[0-9]+Y(?:[0-9]+M)?(?:[0-9]+D)?(?:{_CLOCK})?|[0-9]+M(?:[0-9]+D)?(?:{_CLOCK})?"
                f"|[0-9]+D(?:{_CLOCK})?|{_CLOCK})",
    "email": f"{_ATOM}(?:\\.{_ATOM})*@(?:{_HOSTNAME}|\\[{_IPV4}\\])",  # (no quoted local parts)
    "hostname": _HOSTNAME,
    "ipv4": _IPV4,
    "ipv6": _ipv6(),
    "uuid": f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}",
    "uri": "[A-Za-z][A-Za-z0-9+.-]*:(?:[A-Za-z0-9._~:/?#\\[\\]@!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*",
}


def format_regex(name: str) -> str:
    """The regex of a raw string value of this format; GrammarError for a format the grammar cannot check."""
    if name not in FORMAT_REGEX:
        raise GrammarError(f"unknown string format {name!r} (known: {', '.join(FORMAT_REGEX)})")
    return FORMAT_REGEX[name]
