"""The stdlib MIME parser, made linear and bounded for mail that strangers send (issue 13).

``message.parse`` reads mail with the compat32 feed parser: it is fast and never raises on
header syntax. Three things in it are unsafe on hostile mail, and are closed here:

- ``Message.get_params``/``get_param``/``get_boundary`` are quadratic in the ``;`` of a value
  with a quote in it (``text/plain; a="x;;;…``: 100,000 took 5 s, 950,000 took 444 s), and the
  feed parser calls ``get_boundary`` itself; so is ``set_boundary``, which the generator calls
  to re-serialise an attached message with an empty boundary (100,000 took 7 s). ``Part``
  replaces the parser under all of them with a linear tokenizer that reads at most
  ``MAX_PARAM_CHARS`` of a value and ``MAX_PARAMS`` parameters.
- Memory and time grow with parts, header fields and nesting far beyond the message size
  (190,000 empty parts in 1 MB took 92 MB; every line is checked against every open boundary).
  ``read`` caps them per message: ``MAX_PARTS``, ``MAX_HEADER_FIELDS``, ``MAX_DEPTH``,
  ``MAX_LINES``. What was cut is named in ``ParseBudget.truncated``.
- The stdlib decodes with whatever codec a message names: ``unicode-escape`` and ``utf-7``
  yield lone surrogates, which no strict JSON or UTF-8 consumer takes. ``decode_bytes`` decodes
  only with real mail charsets and never returns a lone surrogate.

Parts are read-only once parsed. No I/O here.
"""

from __future__ import annotations

import codecs
import email.feedparser
import re
import urllib.parse
from collections.abc import Mapping
from email.feedparser import FeedParser
from email.message import Message
from email.policy import compat32
from email.utils import quote, unquote
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MAX_HEADER_FIELDS",
    "MAX_LINES",
    "MAX_PARAMS",
    "MAX_PARAM_CHARS",
    "MAX_PARTS",
    "ParseBudget",
    "Part",
    "decode_bytes",
    "read",
    "scrub",
    "split_params",
    "text_of",
]

# MIME parts (containers and leaves) read per message; the parser stops beyond.
MAX_PARTS = 1_000
# Header fields kept per message, all parts together (the top-level ones come first).
MAX_HEADER_FIELDS = 10_000
# Nesting levels (multipart/* and message/*): a container this deep is kept whole and unread.
# The feed parser checks each line against every open boundary, so depth multiplies the cost.
MAX_DEPTH = 16
# Lines the feed parser reads per message (multipart and message/* only: a single part is
# not read line by line). It holds each part's lines in a list, ~50 bytes a line, and checks
# each against every open boundary: 1 to 5 µs a line. A 25 MiB message of base64 or
# quoted-printable parts has about 350,000.
MAX_LINES = 500_000
# Of one Content-Type or Content-Disposition value: the rest is ignored (a real one is < 1 KB).
MAX_PARAM_CHARS = 16 * 1024
MAX_PARAMS = 64
_CHUNK = 8192  # what the stdlib's Parser feeds at a time


class _LineEndAtEnd:
    """The feed parser's ``NLCRE_eol``, ``(\\r\\n|\\r|\\n)\\Z``, searched from the last two
    characters. The stdlib searches the whole payload of every part for the line end before its
    boundary: one regex call, holding the GIL, over a 25 MB attachment took 200 ms, and the event
    loop waits for the thread that parses (bench/many_mailboxes.py). The same match: a line end
    is at most two characters."""

    _pattern = re.compile(r"(\r\n|\r|\n)\Z")

    def search(self, text: str) -> re.Match[str] | None:
        return self._pattern.search(text, max(0, len(text) - 2))


# A private name of the stdlib (tests/test_message.py fails loudly if an upgrade changes it).
if isinstance(vars(email.feedparser).get("NLCRE_eol"), re.Pattern):
    vars(email.feedparser)["NLCRE_eol"] = _LineEndAtEnd()

# WHATWG-style relabelling of charsets that mail gets wrong or Python does not know.
_CHARSET_ALIASES: Mapping[str, str | None] = {
    "us-ascii": None,
    "ascii": None,
    "unknown-8bit": None,
    "x-unknown": None,
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "gb2312": "gbk",
    "iso-8859-8-i": "iso-8859-8",
    "ks_c_5601-1987": "cp949",
    "windows-874": "cp874",
    "x-mac-cyrillic": "mac-cyrillic",
}
# Text charsets that mail declares (IANA names, the WHATWG Encoding Standard's list, the ISO 2022
# forms). Anything else Python knows (unicode-escape, raw-unicode-escape, punycode, idna, the
# bytes-to-bytes codecs base64/zlib/rot13...) is not a mail charset: it is read as UTF-8 or
# Windows-1252 instead. UTF-7 (RFC 2152) stays; its lone surrogates are scrubbed. Each is the
# ``codecs.lookup(label).name`` of its codec (tests/test_mime.py checks), written out: looking
# them up here would import 70 codec modules, 1.7 MiB, at start (issue 23).
_MAIL_CODECS = frozenset(
    (  # noqa: SIM905 (a list, one name per line, would be 60 lines)
        "utf-8 utf-16 utf-16-le utf-16-be utf-32 utf-32-le utf-32-be utf-7 "
        "iso8859-2 iso8859-3 iso8859-4 iso8859-5 iso8859-6 iso8859-7 iso8859-8 "
        "iso8859-9 iso8859-10 iso8859-11 iso8859-13 iso8859-14 iso8859-15 iso8859-16 "
        "cp1250 cp1251 cp1252 cp1253 cp1254 cp1255 cp1256 cp1257 cp1258 cp874 tis-620 "
        "koi8-r koi8-u mac-roman mac-cyrillic cp437 cp850 cp852 cp866 ptcp154 kz1048 "
        "gbk gb18030 hz big5 big5hkscs cp950 euc_jp shift_jis cp932 euc_jis_2004 "
        "shift_jis_2004 iso2022_jp iso2022_jp_1 iso2022_jp_2 iso2022_jp_3 iso2022_jp_ext "
        "euc_kr cp949 iso2022_kr johab"
    ).split()
)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (strict UTF-8 and JSON refuse them)."""
    return text if text.isascii() else _LONE_SURROGATE.sub("\ufffd", text)


def decode_bytes(data: bytes, charset: str | None) -> str:
    """``data`` as text: the declared charset when it is a mail charset Python knows, else
    UTF-8, else Windows-1252. Never a lone surrogate."""
    if charset:
        label = charset.strip().strip("\"'").lower()
        codec = _CHARSET_ALIASES.get(label, label)
        if codec:
            try:
                if codecs.lookup(codec).name in _MAIL_CODECS:
                    return scrub(data.decode(codec, "replace"))
            except (LookupError, UnicodeError, ValueError, TypeError):
                pass  # unknown charset, or a decoder that chokes on the data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def text_of(value: str) -> str:
    """A raw header value (8-bit bytes kept as surrogate escapes, as compat32 reads them) as
    text: RFC 6532 says 8-bit headers are UTF-8; others are read as Windows-1252."""
    if value.isascii():
        return value
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte stands for
        data = scrub(value).encode("utf-8", "surrogateescape")
    return decode_bytes(data, None)


# One parameter of a MIME header: anything up to a ";" outside a quoted string (RFC 2045 §5.1,
# RFC 5322 §3.2.4 quoted-pair). An unterminated quote runs to the end, as the stdlib reads it.
# Possessive throughout, and each alternative starts with its own character: linear.
_SEGMENT = re.compile(r'(?:[^;"]++|"(?:[^"\\]++|\\.?)*+"?)*+', re.DOTALL)
# RFC 2231 §3-4: name*, name*0, name*0*, name*1 ... (the stdlib's rfc2231_continuation).
_RFC2231_NAME = re.compile(r"([A-Za-z0-9_]+)\*(?:([0-9]{1,3})\*?)?")


def split_params(value: str) -> tuple[str, list[tuple[str, str]], bool]:
    """The value of a MIME header, its parameters, and whether any were cut off.

    What ``Message.get_params`` returns (lower-case names, unquoted values; plain parameters
    first, then the RFC 2231 ones, continuations joined and ``charset'language'value``
    decoded), in linear time over at most ``MAX_PARAM_CHARS`` and ``MAX_PARAMS``. Plain values
    keep 8-bit bytes as surrogate escapes, as the feed parser needs a boundary.
    """
    truncated = len(value) > MAX_PARAM_CHARS
    value = value[:MAX_PARAM_CHARS]
    segments: list[str] = []
    pos = 0
    while True:
        match = _SEGMENT.match(value, pos)
        end = match.end() if match else pos  # (it always matches: the empty string too)
        segments.append(value[pos:end])
        pos = end + 1  # past the ";"
        if pos > len(value):
            break
        if len(segments) > MAX_PARAMS:
            truncated = True
            break
    main = segments[0].partition("=")[0].strip().lower()
    params: list[tuple[str, str]] = []
    continued: dict[str, list[tuple[int, str, bool]]] = {}
    for segment in segments[1:]:
        name, equals, raw = segment.partition("=")
        name = name.strip().lower()
        text = unquote(raw.strip()) if equals else ""
        rfc2231 = _RFC2231_NAME.fullmatch(name)
        if rfc2231 is None:
            params.append((name, text))
        else:
            number = -1 if rfc2231[2] is None else int(rfc2231[2])
            continued.setdefault(rfc2231[1], []).append((number, text, name.endswith("*")))
    for name, pieces in continued.items():
        pieces.sort(key=lambda piece: piece[0])
        # Encoded pieces are %-escaped octets; read as Latin-1, one character per octet.
        joined = "".join(
            urllib.parse.unquote(text, encoding="latin-1") if encoded else text
            for _, text, encoded in pieces
        )
        if any(encoded for _, _, encoded in pieces):
            charset: str | None = None
            if joined.count("'") >= 2:  # RFC 2231 §4: charset'language'text
                charset, _, joined = joined.split("'", 2)
            joined = decode_bytes(_octets(joined), charset or None)
        params.append((name, joined))
    return main, params, truncated


def _octets(text: str) -> bytes:
    """%-decoded text (one character per octet, 8-bit bytes as surrogate escapes) as bytes."""
    try:
        return text.encode("latin-1", "surrogateescape")
    except UnicodeEncodeError:  # not from the wire: a character above U+00FF
        return text.encode("utf-8", "replace")


class ParseBudget:
    """What one message may still take (parts, header fields), and what was cut."""

    def __init__(self) -> None:
        self.parts = 0
        self.fields = 0
        self.truncated: set[str] = set()

    def part(self, policy: Any = compat32) -> Part:
        """The feed parser's message factory: a ``Part`` counted against this budget."""
        self.parts += 1
        part = Part(policy)
        part.budget = self
        return part


class Part(Message):
    """A compat32 ``Message`` with linear MIME parameters and the per-message caps.

    ``get_params``/``get_param`` (and through them ``get_boundary``, ``get_content_charset``,
    ``get_filename``, which the feed parser and the generator call) use ``split_params``: values
    are unquoted ``str``, RFC 2231 values already decoded; so does ``_get_params_preserve``
    (under ``set_boundary``). A container nested ``MAX_DEPTH`` deep reads as
    ``application/octet-stream`` (``opaque``): the parser keeps it unread.
    """

    budget: ParseBudget | None = None
    depth = 0
    opaque = False

    def set_raw(self, name: str, value: str) -> None:
        budget = self.budget
        if budget is not None:
            if budget.fields >= MAX_HEADER_FIELDS:
                budget.truncated.add("header_fields")
                return
            budget.fields += 1
        super().set_raw(name, value)

    def attach(self, payload: Any) -> None:
        if isinstance(payload, Part):
            payload.depth = self.depth + 1
        super().attach(payload)

    def get_content_type(self) -> str:
        content_type = super().get_content_type()
        if self.depth >= MAX_DEPTH and content_type.startswith(("multipart/", "message/")):
            self.opaque = True
            if self.budget is not None:
                self.budget.truncated.add("nesting")
            return "application/octet-stream"
        return content_type

    def raw_header(self, name: str) -> str | None:
        """The first value of header ``name`` as stored (8-bit bytes as surrogate escapes)."""
        name = name.lower()
        return next((str(v) for k, v in self.raw_items() if k.lower() == name), None)

    def split(self, header: str) -> tuple[str, list[tuple[str, str]]] | None:
        """``split_params`` of ``header``, or None when the part has no such header."""
        value = self.raw_header(header)
        if value is None:
            return None
        main, params, truncated = split_params(value)
        if truncated and self.budget is not None:
            self.budget.truncated.add("parameters")
        return main, params

    def get_params(
        self, failobj: Any = None, header: str = "content-type", unquote: bool = True
    ) -> Any:
        """As ``Message.get_params``; values are always unquoted (``unquote`` is ignored)."""
        split = self.split(header)
        if split is None:
            return failobj
        main, params = split
        return [(main, ""), *params]

    def get_param(
        self, param: str, failobj: Any = None, header: str = "content-type", unquote: bool = True
    ) -> Any:
        """As ``Message.get_param``: the first parameter ``param``; an unquoted ``str``."""
        split = self.split(header)
        if split is None:
            return failobj
        param = param.lower()
        return next((v for k, v in split[1] if k == param), failobj)

    def _get_params_preserve(self, failobj: Any, header: str) -> Any:
        """The stdlib's private parser under ``set_boundary``, ``set_param`` and ``del_param``
        (the generator calls ``set_boundary`` for a multipart whose boundary is empty, which
        the feed parser accepts): ``split_params``, values quoted again as those write them."""
        split = self.split(header)
        if split is None:
            return failobj
        main, params = split
        return [(main, ""), *((name, f'"{quote(value)}"') for name, value in params)]


def _feed(data: str | bytes, budget: ParseBudget) -> Part:
    """The feed parser over ``data``, stopped once it made more than ``MAX_PARTS`` parts or
    read more than ``MAX_LINES`` lines (what it read so far is kept). Bytes are read as ASCII
    with surrogate escapes, as BytesParser does, a chunk at a time: decoded whole, a 25 MB
    message would be one more 25 MB str while the parser holds its lines."""
    parser = FeedParser(_factory=budget.part, policy=compat32)
    lines = 0
    for start in range(0, len(data), _CHUNK):
        piece = data[start : start + _CHUNK]
        chunk = piece if isinstance(piece, str) else piece.decode("ascii", "surrogateescape")
        parser.feed(chunk)
        lines += max(chunk.count("\n"), chunk.count("\r"))  # LF, CRLF or CR (RFC 5322 §2.1)
        if budget.parts > MAX_PARTS:
            budget.truncated.add("parts")
            break
        if lines > MAX_LINES:
            budget.truncated.add("lines")
            break
    root = parser.close()
    if not isinstance(root, Part):  # every part comes from budget.part
        raise TypeError(f"the feed parser made a {type(root).__name__}, not a Part")
    return root


# The end of the header block, r"\r?\n\r?\n", found by its first LF: a pattern that starts
# with a literal is searched for six times faster. The CR before that LF, if any, is
# added back in ``_single_part``.
_HEADER_END = re.compile(rb"\n\r?\n")
# One header field as the compat32 feed parser reads it (headerRE, _parse_headers,
# header_source_parse), minus the unix-from line and the empty name: its name, and its value
# after the colon and any spaces and tabs, with its continuation lines (their line ends kept).
# The name by a pattern, the value's end by a search for the first line end not followed by a
# space or a tab: a pattern repeating a group per continuation line kept ~160 bytes of state
# for each (a Subject folded into 6 M lines cost 1 GB, issue 18); this keeps none.
_FIELD_NAME = re.compile(r"([\041-\071\073-\176]+):[ \t]*")
_FIELD_END = re.compile(r"\n(?![ \t])")


def header_fields(block: str, limit: int = MAX_HEADER_FIELDS) -> list[tuple[str, str]] | None:
    """The fields of a header block (without its final line end) exactly as the compat32 feed
    parser stores them, for a block it reads without a defect; None for anything else (a lone
    CR, a unix-from line, a line that is neither a field nor a continuation), which the stdlib
    parser then reads. Stops after ``limit + 1`` fields (one over: ``Part.set_raw`` notes it).
    Linear in time and memory, however a field is folded."""
    if "\r" in block and block.count("\r") != block.count("\r\n"):
        return None
    fields: list[tuple[str, str]] = []
    pos, size = 0, len(block)
    while pos < size and len(fields) <= limit:
        match = _FIELD_NAME.match(block, pos)
        if match is None:
            return None
        end = _FIELD_END.search(block, match.end())
        stop = end.start() if end is not None else size
        fields.append((match[1], block[match.end() : stop].rstrip("\r\n")))
        pos = stop + 1
    return fields


def _single_part(raw: bytes, budget: ParseBudget) -> Part | None:
    """The common case fast: a message that is not multipart has its header block parsed
    and its body set whole, skipping the feed parser's line-by-line walk (about 3 times
    faster for 2 KB). Anything multipart, message/*, or oddly framed takes the full parser.
    """
    end = _HEADER_END.search(raw)
    if end is None:
        return None
    start = end.start()
    if start and raw[start - 1] == 0x0D:  # CR
        start -= 1
    # As BytesParser does: ASCII with surrogate escapes for 8-bit bytes.
    head = raw[:start].decode("ascii", "surrogateescape")
    fields = header_fields(head)
    if fields is not None:
        msg = budget.part()
        for name, value in fields:
            msg.set_raw(name, value)
    else:
        msg = _feed(head + "\r\n", budget)
    if msg.defects or msg.get_content_maintype() in ("multipart", "message"):
        return None
    # As BytesParser does: the body as ASCII with surrogate escapes, decoded on demand.
    msg.set_payload(raw[end.end() :].decode("ascii", "surrogateescape"))
    return msg


def read(raw: bytes) -> tuple[Part, ParseBudget]:
    """``raw`` as a tree of ``Part`` within the caps, and the budget saying what was cut."""
    budget = ParseBudget()
    msg = _single_part(raw, budget)
    if msg is not None:
        return msg, budget
    budget = ParseBudget()  # the fast path's fields do not count twice
    return _feed(raw, budget), budget
