"""Which HTTP proxy a request goes through: the config's ``proxy``, else the environment.

Many company networks reach Entra ID and Microsoft Graph (and sometimes the webhook) only
through an HTTP proxy, named the way every HTTP client reads it: ``HTTPS_PROXY`` for https
URLs, ``HTTP_PROXY`` for http ones, ``ALL_PROXY`` for both (upper or lower case; the lower case
wins, as in curl and requests), and ``NO_PROXY`` listing hosts, domains (``.example.com``),
ports and CIDR blocks to reach directly. A config key ``proxy:`` overrides the environment for
its client: a URL (``http://proxy:3128``, credentials allowed, never shown), or ``direct`` for
none. HTTPS goes through the proxy with CONNECT, so the proxy sees only the host name.
``.netrc`` is never read.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

__all__ = ["DIRECT", "proxy_for"]

DIRECT = "direct"


def _env(name: str, env: Mapping[str, str]) -> str:
    return env.get(name.lower()) or env.get(name.upper()) or ""


def _bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` names ``host`` (curl's rules: ``*``, names and their subdomains,
    ``.domain``, ``host:port``, IP addresses and CIDR blocks)."""
    host = host.strip("[]").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if entry.startswith("["):  # [IPv6] or [IPv6]:port
            name, _, rest = entry[1:].partition("]")
            entry_port = rest.removeprefix(":")
        elif entry.count(":") == 1:  # host:port (a bare IPv6 address has more colons)
            name, _, entry_port = entry.rpartition(":")
        else:
            name, entry_port = entry, ""
        if entry_port and (not entry_port.isdigit() or int(entry_port) != port):
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def proxy_for(
    url: str, configured: str | None = None, env: Mapping[str, str] | None = None
) -> str | None:
    """The proxy URL for a request to ``url``, or None to connect directly."""
    if configured is not None:
        return None if configured == DIRECT else configured
    env = os.environ if env is None else env
    parts = urlsplit(url)
    proxy = _env(f"{parts.scheme}_proxy", env) or _env("all_proxy", env)
    if not proxy or _bypassed(parts.hostname or "", parts.port, _env("no_proxy", env)):
        return None
    return proxy
