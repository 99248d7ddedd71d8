"""Parse time and peak memory of ``message.parse`` (and the JSON payload) for hostile shapes.

Each shape runs in a fresh child process, so its peak RSS is its own: the child builds the
input, records its RSS, parses (``message.parse``), builds the webhook JSON body
(``webhook.payload_body``), decides (routing, and the notice policy: its recipient and every
Authentication-Results header), and reports the time of each step, the Python heap peak
(tracemalloc, a second run) and the growth of the peak RSS over the RSS before the parse, each
also per input byte. The shapes are those of issue 13 (quadratic MIME parameters, 190,000
empty parts, 100,000 Cc lines), their relatives, and the worst inputs the unit tests feed
(deep nesting, ``for <`` repeated in Received, ``<`` repeated in an address header, hostile
Authentication-Results): the tests check what comes out, this measures how long it takes.
First it prints the mean parse time of an ordinary 2 KB message.

Run with ``make bench`` (after the IMAP benchmarks) or ``python bench/parse_worst.py``;
``--shape NAME`` runs one shape in this process, ``--quick`` skips the largest inputs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailroom.delivery import notices, webhook  # noqa: E402
from mailroom.mail import authresults, message, routing  # noqa: E402
from tests.hostile import envelope  # noqa: E402

HEAD = b"From: a@example.org\nTo: incoming+k@example.com\nSubject: s\nMIME-Version: 1.0\n"
MULTIPART = HEAD + b'Content-Type: multipart/mixed; boundary="z"\n\n'
NO_KEY = HEAD.replace(b"To: incoming+k@example.com\n", b"")  # routing reads every candidate
RULES = routing.RoutingRules(address=routing.AddressTemplate.parse("incoming+%{key}@example.com"))
ORDINARY = ROOT / "tests" / "eml" / "plain_2k.eml"


def _quoted_params(n: int) -> bytes:
    # Issue 13: one '"' sends the value to the stdlib's get_params (quadratic in the ';').
    return HEAD + b'Content-Type: text/plain; a="x' + b";" * n + b"\n\nbody\n"


def _quoted_boundary(n: int) -> bytes:
    # The feed parser itself asks get_boundary for every multipart part.
    return HEAD + b'Content-Type: multipart/mixed; boundary="x' + b";" * n + b"\n\n--x\n\n"


def _quoted_disposition(n: int) -> bytes:
    part = b'Content-Type: text/plain\nContent-Disposition: attachment; filename="x'
    return MULTIPART + b"--z\n" + part + b";" * n + b"\n\nbody\n--z--\n"


def _empty_boundary(n: int) -> bytes:
    # The generator that measures an attached message rewrites an empty boundary with the
    # stdlib's set_boundary, quadratic in the same way.
    inner = b'Content-Type: multipart/mixed; boundary=""; a="x' + b";" * n + b"\n\n--\n\nx\n----\n"
    return HEAD + b"Content-Type: message/rfc822\n\n" + inner


def _empty_parts(n: int) -> bytes:
    return MULTIPART + b"--z\n\n" * n + b"--z--\n"


def _cc_lines(n: int) -> bytes:
    return HEAD + b"Cc: someone@example.org\n" * n + b"\nbody\n"


def _one_address_list(n: int) -> bytes:
    return HEAD + b"Cc: " + b", ".join(b"u%d@example.org" % i for i in range(n)) + b"\n\nbody\n"


def _header_fields_in_parts(n: int) -> bytes:
    part = b"--z\n" + b"X-A: b\n" * 50 + b"\nx\n"
    return MULTIPART + part * (n // 50) + b"--z--\n"


def _deep_then_lines(n: int) -> bytes:
    # 250 open multipart levels (under the container limit), then many short lines: the feed
    # parser checks every line against every open boundary.
    levels = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(250)
    )
    return HEAD + levels + b"Content-Type: text/plain\n\n" + b"x\n" * n


def _short_lines_in_a_part(n: int) -> bytes:
    # The feed parser keeps every line of a part in a list (~50 bytes a line).
    return MULTIPART + b"--z\n\n" + b"\n" * n + b"--z--\n"


def _encoded_words(n: int) -> bytes:
    return HEAD.replace(b"Subject: s", b"Subject: " + b"=?utf-8?q?=C3=A9?= " * n) + b"\nbody\n"


def _utf7_body(n: int) -> bytes:
    return HEAD + b"Content-Type: text/plain; charset=utf-7\n\n" + b"+2D0-" * n + b"\n"


def _long_header_line(n: int) -> bytes:
    return HEAD + b"X-Long: " + b"a" * n + b"\n\nbody\n"


def _text_body(n: int) -> bytes:
    line = b"Gr\xc3\xbc\xc3\x9fe, this is a plain line of an ordinary long text body.\n"
    return HEAD + b"Content-Type: text/plain; charset=utf-8\n\n" + line * (n // len(line))


def _attached_messages(n: int) -> bytes:
    inner = b"Content-Type: message/rfc822\n\nSubject: inner\nX: y\n\nhello\n"
    return MULTIPART + (b"--z\n" + inner) * n + b"--z--\n"


def _nested_levels(n: int) -> bytes:
    # The stdlib parser recursed once per level (RecursionError at about 1,000).
    levels = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(n)
    )
    return HEAD + levels


def _received_for(n: int) -> bytes:
    # A backtracking pattern over `for <` took quadratic time; Cc is scanned last.
    received = b"Received: from a by b " + b"for <" * n + b"; Mon, 01 Jan 2024 10:00:00 +0000\n"
    return NO_KEY + received + b"Cc: " + b"<" * n + b"\n\nbody\n"


def _address_scan(n: int) -> bytes:
    # Addresses scanned out of free text (Delivered-To, X-Loop, the notice's recipient).
    fields = b"Delivered-To: " + b"<" * n + b"x@y.z>\nX-Loop: " + b"a" * n + b"\n"
    return NO_KEY + fields + b"\nbody\n"


def _auth_results(n: int) -> bytes:
    values = (b"(" * n, b'"' * n, b"a=" * (n // 2), b";" * n)
    return HEAD + b"".join(b"Authentication-Results: " + v + b"\n" for v in values) + b"\nbody\n"


SHAPES: dict[str, tuple[Callable[[int], bytes], tuple[int, ...], tuple[int, ...]]] = {
    # name: (builder, quick sizes, full sizes)
    "params_quote": (_quoted_params, (100_000, 200_000), (100_000, 200_000, 950_000)),
    "boundary_quote": (_quoted_boundary, (200_000,), (200_000, 950_000)),
    "disposition_quote": (_quoted_disposition, (200_000,), (200_000, 950_000)),
    "empty_boundary": (_empty_boundary, (100_000,), (100_000, 950_000)),
    "empty_parts": (_empty_parts, (190_000,), (190_000, 1_000_000)),
    "cc_lines": (_cc_lines, (100_000,), (100_000, 1_000_000)),
    "address_list": (_one_address_list, (50_000,), (50_000, 1_000_000)),
    "fields_in_parts": (_header_fields_in_parts, (100_000,), (100_000, 1_000_000)),
    "deep_then_lines": (_deep_then_lines, (100_000,), (100_000, 1_000_000)),
    "short_lines": (_short_lines_in_a_part, (1_000_000,), (1_000_000, 25_000_000)),
    "encoded_words": (_encoded_words, (50_000,), (50_000, 500_000)),
    "utf7_body": (_utf7_body, (200_000,), (200_000, 2_000_000)),
    "long_header_line": (_long_header_line, (1_000_000,), (1_000_000, 10_000_000)),
    "text_body": (_text_body, (1 << 20,), (1 << 20, 25 << 20)),
    "attached_messages": (_attached_messages, (10_000,), (10_000, 100_000)),
    "nested_levels": (_nested_levels, (3_000,), (3_000, 30_000)),
    "received_for": (_received_for, (100_000,), (100_000, 1_000_000)),
    "address_scan": (_address_scan, (200_000,), (200_000, 2_000_000)),
    "auth_results": (_auth_results, (100_000,), (100_000, 1_000_000)),
}


def decide(parsed: message.ParsedMessage) -> None:
    """What the dispatcher reads of a message besides the payload: the routing decision, the
    notice's recipient, and every Authentication-Results header (as trusted authserv-ids do)."""
    routing.decide(parsed, RULES)
    notices.notice_recipient(parsed, RULES)
    for value in parsed.authentication_results:
        authresults.parse_authentication_results(value)


def ordinary(runs: int = 500) -> float:
    """The mean parse time of an ordinary 2 KB message, best of three rounds of ``runs``."""
    raw = ORDINARY.read_bytes()
    return min(timeit.repeat(lambda: message.parse(raw), number=runs, repeat=3)) / runs


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(shape: str, n: int) -> dict[str, float]:
    """Run one shape in this process; the numbers ``main`` prints."""
    raw = SHAPES[shape][0](n)
    decision = routing.Deliver(key="k", matched_header="to")
    rss_before = _rss_bytes()
    started = time.perf_counter()
    parsed = message.parse(raw)
    parsed_at = time.perf_counter()
    body = webhook.payload_body(envelope(raw), parsed, decision)
    done = time.perf_counter()
    decide(parsed)
    decided = time.perf_counter()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del parsed, body
    tracemalloc.start()
    parsed = message.parse(raw)
    parse_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    webhook.payload_body(envelope(raw), parsed, decision)
    payload_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "bytes": len(raw),
        "parse_s": parsed_at - started,
        "payload_s": done - parsed_at,
        "decide_s": decided - done,
        "parse_peak": parse_peak,
        "payload_peak": payload_peak,
        "rss_growth": max(rss_peak - rss_before, 0),
        "parts": len(parsed.attachments),
        "defects": len(parsed.defects),
    }


def _run_child(shape: str, n: int, timeout_s: float) -> dict[str, float] | str:
    command = [sys.executable, __file__, "--shape", shape, "--n", str(n)]
    try:
        done = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return f"over {timeout_s:.0f} s"
    if done.returncode != 0:
        return f"failed: {done.stderr.strip().splitlines()[-1:]}"
    result: dict[str, float] = json.loads(done.stdout)
    return result


def _mb(n: float) -> str:
    return f"{n / (1 << 20):7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--n", type=int)
    parser.add_argument("--quick", action="store_true", help="skip the largest inputs")
    parser.add_argument("--timeout", type=float, default=120.0, help="per shape and size")
    args = parser.parse_args()
    if args.shape and args.n:
        print(json.dumps(measure(args.shape, args.n)))
        return
    print(f"an ordinary 2 KB message ({ORDINARY.name}): parsed in {ordinary() * 1000:.3f} ms")
    print(
        f"{'shape':<18} {'n':>9} {'MB in':>7} {'parse s':>8} {'json s':>7} {'decide s':>8} "
        f"{'µs/KB':>7} {'heap MB':>7} {'/byte':>6} {'RSS+ MB':>7} {'/byte':>6}"
    )
    for shape in [args.shape] if args.shape else SHAPES:
        _, quick, full = SHAPES[shape]
        for n in quick if args.quick else full:
            result = _run_child(shape, n, args.timeout)
            if isinstance(result, str):
                print(f"{shape:<18} {n:>9} {result}")
                continue
            size = result["bytes"]
            peak = max(result["parse_peak"], result["payload_peak"])
            print(
                f"{shape:<18} {n:>9} {_mb(size)} {result['parse_s']:8.3f} "
                f"{result['payload_s']:7.3f} {result['decide_s']:8.3f} "
                f"{result['parse_s'] * 1e6 / (size / 1024):7.1f} "
                f"{_mb(peak)} {peak / size:6.1f} {_mb(result['rss_growth'])} "
                f"{result['rss_growth'] / size:6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
