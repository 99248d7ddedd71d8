"""The ERB in the GitLab Helm chart's MailRoom config, evaluated without running Ruby.

MailRoom renders its config file with ERB before it reads the YAML. The chart's ConfigMap uses
ERB only to read the secrets it mounts::

    :password: <%= File.read("/etc/gitlab/mailroom/password_incoming_email").strip.to_json %>
    :redis_url: redis://:<%= ERB::Util::url_encode(File.read("/etc/gitlab/redis/redis-password")
      .strip) %>@gitlab-redis-master:6379      (on one line)

So ``<%= EXPR %>`` is evaluated here for this family of expressions, and nothing else:

- a value: ``File.read("PATH")``, ``ENV["NAME"]``, ``ENV.fetch("NAME")``, ``ENV.fetch("NAME",
  "default")`` or a string literal (single or double quotes, no interpolation);
- ``ERB::Util.url_encode(EXPR)`` (also written ``ERB::Util::url_encode``);
- followed by any of ``.strip``, ``.chomp``, ``.to_json``, ``.to_s``, as Ruby defines them.

Any other ``<% ... %>`` (code, loops, ``-%>`` trimming) is refused, naming its line: mailroom
runs no code from a config file. ``<%# ... %>`` comments render as nothing and ``<%%`` as
``<%``, as in ERB. The text is scanned once, left to right; every expression is parsed in time
linear in its length.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

__all__ = ["ErbError", "render"]

RUBY_WHITESPACE = "\x00\t\n\v\f\r "  # String#strip: whitespace and null
_HEAD = re.compile(r"\s*(File\.read\(|ENV\[|ENV\.fetch\(|ERB::Util(?:\.|::)url_encode\()?")
# A string literal without interpolation: "..." (no #{, #$, #@) or '...'
_STRING = re.compile(r"""\s*(?:"((?:[^"\\#]|\\.|#(?![{$@]))*)"|'((?:[^'\\]|\\.)*)')""")
_CLOSE = {"File.read(": ")", "ENV[": "]", "ENV.fetch(": ")"}
_METHOD = re.compile(r"\s*\.\s*(strip|chomp|to_json|to_s)\b(?:\(\s*\))?")
_MAX_FILE_BYTES = 64 * 1024
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "s": " ", "e": "\x1b", "\\": "\\"}


class ErbError(ValueError):
    """What is wrong, with the line it is on; never a value read from a file."""


def render(text: str, env: Mapping[str, str]) -> str:
    """``text`` with each ``<%= ... %>`` replaced by its value."""
    out: list[str] = []
    position = 0
    for _ in range(len(text) + 1):  # one turn per tag: bounded by the text's length
        start = text.find("<%", position)
        if start < 0:
            out.append(text[position:])
            return "".join(out)
        out.append(text[position:start])
        line = text.count("\n", 0, start) + 1
        if text.startswith("<%%", start):
            out.append("<%")
            position = start + 3
            continue
        end = text.find("%>", start + 2)
        if end < 0:
            raise ErbError(f"line {line}: <% without a closing %>")
        tag = text[start + 2 : end]
        position = end + 2
        if tag.startswith("#"):
            continue  # an ERB comment
        if not tag.startswith("=") or tag.endswith("-"):
            raise ErbError(
                f"line {line}: ERB code (<% ... %>) that mailroom does not run; only "
                '<%= File.read("PATH").strip.to_json %> and its kind (ENV["NAME"], ENV.fetch, '
                "ERB::Util.url_encode, .strip, .chomp, .to_json) are evaluated"
            )
        out.append(_evaluate(tag[1:], line, env))
    raise AssertionError("unreachable")  # pragma: no cover


def _evaluate(source: str, line: int, env: Mapping[str, str]) -> str:
    value, rest = _expression(source, line, env)
    if rest.strip():
        raise ErbError(
            f"line {line}: <%= {_shown(source)} %> is not an expression mailroom evaluates "
            '(File.read("PATH"), ENV["NAME"], ENV.fetch, ERB::Util.url_encode, then .strip, '
            ".chomp, .to_json)"
        )
    return "" if value is None else value


def _expression(source: str, line: int, env: Mapping[str, str]) -> tuple[str | None, str]:
    """The value of the expression at the start of ``source``, and what follows it."""
    if (head := _HEAD.match(source)) is None:  # everything in it is optional: it matches
        raise ErbError(f"line {line}: <%= {_shown(source)} %> cannot be read")
    call, rest = head.group(1) or "", source[head.end() :]
    value: str | None
    if call.startswith("ERB::Util"):
        inner, rest = _expression(rest, line, env)
        value = quote(inner or "", safe="-._~")  # ERB::Util.url_encode: all but [A-Za-z0-9_.~-]
        rest = _expect(rest, ")", source, line)
    else:
        literal, rest = _string(rest, source, line)
        if not call:
            value = literal
        elif call == "File.read(":
            value = _read(literal, line)
        elif call == "ENV[":
            value = env.get(literal)  # nil when unset, as in Ruby
        else:  # ENV.fetch("NAME") or ENV.fetch("NAME", "default")
            default = None
            if comma := re.match(r"\s*,", rest):
                default, rest = _string(rest[comma.end() :], source, line)
            value = env.get(literal, default)
            if value is None:
                raise ErbError(f"line {line}: ENV.fetch({literal!r}): the variable is not set")
        if call:
            rest = _expect(rest, _CLOSE[call], source, line)
    for _ in range(len(rest) + 1):  # the methods called on it, each at least one character
        method = _METHOD.match(rest)
        if method is None:
            break
        value = _call(value, method.group(1), line)
        rest = rest[method.end() :]
    return value, rest


def _string(text: str, source: str, line: int) -> tuple[str, str]:
    """The string literal at the start of ``text``, as Ruby reads it, and what follows."""
    match = _STRING.match(text)
    if match is None:
        raise ErbError(f"line {line}: <%= {_shown(source)} %> is not one mailroom evaluates")
    if match.group(1) is not None:
        return _unquote(match.group(1), double=True), text[match.end() :]
    return _unquote(match.group(2), double=False), text[match.end() :]


def _expect(text: str, closing: str, source: str, line: int) -> str:
    stripped = text.lstrip()
    if not stripped.startswith(closing):
        raise ErbError(f"line {line}: <%= {_shown(source)} %>: {closing} expected")
    return stripped[1:]


def _unquote(body: str, *, double: bool) -> str:
    if not double:  # '...': only \\ and \' are escapes
        return re.sub(r"\\([\\'])", r"\1", body)
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


def _read(path: str, line: int) -> str:
    """``File.read(path)``: the file's text (UTF-8), bounded."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ErbError(
            f'line {line}: File.read("{path}"): {exc.strerror or type(exc).__name__}'
        ) from None
    if len(data) > _MAX_FILE_BYTES:
        raise ErbError(f'line {line}: File.read("{path}"): larger than 64 KiB, not a secret')
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ErbError(f'line {line}: File.read("{path}"): not UTF-8 text') from None


def _call(value: str | None, method: str, line: int) -> str:
    if value is None:
        if method == "to_s":
            return ""
        if method == "to_json":
            return "null"
        raise ErbError(f"line {line}: .{method} of an unset ENV variable (nil in Ruby)")
    if method == "strip":
        return value.strip(RUBY_WHITESPACE)
    if method == "chomp":  # one trailing \r\n, \n or \r
        for ending in ("\r\n", "\n", "\r"):
            if value.endswith(ending):
                return value[: -len(ending)]
        return value
    if method == "to_json":
        return json.dumps(value, ensure_ascii=False)  # Ruby's JSON: the same escapes
    return value


def _shown(source: str) -> str:
    """The start of an expression for a message (it names files, not their contents)."""
    text = " ".join(source.split())
    return text if len(text) <= 80 else text[:80] + "…"
