"""Wire options any user can set: raw content types, base64 JWT secrets and the nonce, the
``Token`` authorization, GitLab's answers, and ``routing: forward_all``."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom.config import ConfigError, WebhookConfig, parse_config
from mailroom.delivery.webhook import Rejected, classify, request_headers
from mailroom.envelope import Outcome
from mailroom.errors import PermanentDeliveryError, TransientDeliveryError
from mailroom.mail import message, routing

EML = Path(__file__).parent / "eml"
KEY = bytes(range(32))
KEY_B64 = base64.b64encode(KEY).decode()


def config(webhook: dict[str, Any], **top: Any) -> Any:
    box = {
        "address": "incoming+%{key}@example.com",
        "host": "imap.example.com",
        "port": 993,
        "ssl": True,
        "user": "incoming@example.com",
        "password": "pw",
    }
    return parse_config(
        {"mailboxes": [box], "webhook": {"url": "https://app.internal/in", **webhook}, **top},
        env={},
    )


def hook(**webhook: Any) -> WebhookConfig:
    result: WebhookConfig = config(webhook).webhook
    return result


def error(webhook: dict[str, Any], base_dir: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "mailboxes": [
                    {"address": "a+%{key}@example.com", "host": "h", "user": "u", "password": "p"}
                ],
                "webhook": {"url": "https://app.internal/in", **webhook},
            },
            env={},
            base_dir=base_dir,
        )
    return str(info.value)


def headers(config: WebhookConfig) -> dict[str, str]:
    return request_headers(
        config, webhook_id="msg_1", body=b"x", content_type=config.request_content_type
    )


def test_content_types() -> None:
    assert hook().request_content_type == "application/json"
    assert hook(format="raw").request_content_type == "message/rfc822"
    raw = hook(format="raw", content_type="text/plain")
    assert headers(raw)["Content-Type"] == "text/plain"
    with_params = hook(format="raw", content_type='text/plain; charset="utf-8"')
    assert with_params.request_content_type == 'text/plain; charset="utf-8"'


@pytest.mark.parametrize(
    ("webhook", "expected"),
    [
        ({"content_type": "text/plain"}, "webhook.content_type: is for format: raw"),
        ({"format": "raw", "content_type": "text plain"}, "is not a media type"),
        ({"format": "raw", "content_type": "text/plain;"}, "is not a media type"),
        ({"token": "t", "token_scheme": "basic"}, "webhook.token_scheme: 'basic' is not one of"),
        ({"jwt": {"secret": "s", "secret_encoding": "hex"}}, "secret_encoding: 'hex' is not"),
        ({"jwt": {"secret": "not base64!", "secret_encoding": "base64"}}, "is not base64 text"),
    ],
)
def test_wire_option_errors(webhook: dict[str, Any], expected: str) -> None:
    assert expected in error(webhook)


def test_a_base64_secret_file_that_is_not_base64_is_named_not_shown(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("this is the plain secret\n")
    text = error({"jwt": {"secret_file": "secret", "secret_encoding": "base64"}}, tmp_path)
    assert f"webhook.jwt.secret_file: {tmp_path / 'secret'} is not base64" in text
    assert "plain secret" not in text


def test_jwt_with_a_base64_secret_as_gitlab_checks_it(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(KEY_B64 + "\n")
    config = hook(jwt={"secret_file": str(tmp_path / "secret"), "secret_encoding": "base64"})
    assert config.jwt is not None and config.jwt.secret_file == str(tmp_path / "secret")
    token = headers(config)["Gitlab-Mailroom-Api-Request"]
    claims = jwt.decode(token, KEY, algorithms=["HS256"], issuer="gitlab-mailroom")
    assert abs(claims["iat"] - time.time()) < 60
    assert len(claims["nonce"]) == 24 and int(claims["nonce"], 16) >= 0
    assert (
        claims["nonce"]
        != jwt.decode(headers(config)["Gitlab-Mailroom-Api-Request"], KEY, algorithms=["HS256"])[
            "nonce"
        ]
    )
    raw = "a raw secret of 32 characters..."
    no_nonce = hook(jwt={"secret": raw, "nonce": False})
    claims = jwt.decode(headers(no_nonce)["Gitlab-Mailroom-Api-Request"], raw, ["HS256"])
    assert set(claims) == {"iss", "iat"}


def test_a_key_pyjwt_refuses_is_a_config_error_and_a_short_one_a_warning() -> None:
    assert "webhook.jwt.secret: is not usable as an HS256 key (HMAC key must not be empty)" in (
        error({"jwt": {"secret": ""}})
    )
    assert "looks like a JWK" in error({"jwt": {"secret": '{"kty": "oct", "k": "c2VjcmV0"}'}})
    short = config({"jwt": {"secret": "s" * 31}})
    assert short.warnings == (
        "webhook.jwt.secret: the key is 31 bytes, and RFC 7518 §3.2 asks for at least 32 for "
        "HS256; where the receiver allows, use a longer secret (GitLab writes base64 of 32 "
        "random bytes: head -c 32 /dev/urandom | base64, with secret_encoding: base64)",
    )
    # PyJWT's own warning (an error under this suite's filterwarnings) is not raised per token.
    token = headers(short.webhook)["Gitlab-Mailroom-Api-Request"]
    assert jwt.decode(token, options={"verify_signature": False})["iss"] == "gitlab-mailroom"
    assert config({"jwt": {"secret": "s" * 32}}).warnings == ()


def test_token_schemes() -> None:
    assert headers(hook(token="t0k"))["Authorization"] == "Bearer t0k"
    token = hook(token='a"b\\c', token_scheme="token")
    # Faraday's token_auth (MailRoom's postback): Token token="<Ruby String#inspect>"
    assert headers(token)["Authorization"] == 'Token token="a\\"b\\\\c"'
    assert 'a"b' not in repr(token)


def test_gitlab_answers() -> None:
    assert classify(200, b'{"success": true}', None) is Outcome.DELIVERED
    with pytest.raises(PermanentDeliveryError) as refused:
        classify(400, b'{"success": false, "message": "We could not process\\nyour email"}', None)
    assert str(refused.value) == "HTTP 400: We could not process your email"
    with pytest.raises(PermanentDeliveryError, match=r"^HTTP 400$"):
        classify(400, b"<html>bad request</html>", None)
    assert classify(422, b'{"reject": "no such project"}', None) == Rejected("no such project")


def test_a_422_reason_is_one_bounded_printable_line() -> None:
    """It is logged and goes into a notice: no line breaks, no lone surrogates (JSON's
    ``\\ud800``), no megabyte of text."""
    answer = b'{"reject": "no such\\nproject \\ud800\\u001b[31m' + b"x" * 100_000 + b'"}'
    result = classify(422, answer, None)
    assert isinstance(result, Rejected)
    assert result.reason.startswith("no such project   [31mxxx")
    assert result.reason.isprintable() and len(result.reason) == 1_001  # 1,000 and "…"


def test_a_401_names_the_jwt_secret_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(KEY_B64)
    config = hook(jwt={"secret_file": str(tmp_path / "secret"), "secret_encoding": "base64"})
    with pytest.raises(TransientDeliveryError) as refused:
        classify(401, b'{"message": "401 Unauthorized"}', None, config)
    assert refused.value.misconfigured
    assert str(tmp_path / "secret") in str(refused.value)
    assert "Gitlab-Mailroom-Api-Request" in str(refused.value)
    with pytest.raises(TransientDeliveryError, match=r"check webhook\.url and its credentials"):
        classify(401, b"", None, hook(token="t"))


@settings(max_examples=300, deadline=None)
@given(status=st.integers(100, 599), body=st.binary(max_size=2000))
def test_classify_never_fails_on_any_answer(status: int, body: bytes) -> None:
    try:
        result = classify(status, body, None)
    except (TransientDeliveryError, PermanentDeliveryError) as exc:
        text = str(exc)
        assert text.isprintable() and len(text) < 400
    else:
        assert result is Outcome.DELIVERED or isinstance(result, Rejected)
        if isinstance(result, Rejected):
            assert result.reason.isprintable() and len(result.reason) <= 1_001


def rules(**switches: Any) -> routing.RoutingRules:
    template = routing.AddressTemplate.parse("incoming+%{key}@incoming.example.com")
    return routing.RoutingRules(address=template, mode=routing.RoutingMode.FORWARD_ALL, **switches)


def decide(name: str, rules: routing.RoutingRules) -> routing.Decision:
    return routing.decide(message.parse((EML / name).read_bytes()), rules)


def test_forward_all_posts_what_match_would_reject() -> None:
    assert decide("no_key.eml", rules()) == routing.Deliver(None, None)
    assert decide("key_to.eml", rules()) == routing.Deliver("k-to", "To")
    assert decide("garbage.eml", rules()) == routing.Deliver(None, None)
    assert decide("auto_submitted.eml", rules()) == routing.Ignore("auto_submitted")
    forward = rules(forward_auto_generated=True)
    for name in ("auto_submitted.eml", "dsn.eml", "null_sender.eml", "precedence_bulk.eml"):
        assert isinstance(decide(name, forward), routing.Deliver), name


def test_routing_block_sets_every_mailbox() -> None:
    assert config({}).mailboxes[0].routing.mode is routing.RoutingMode.MATCH
    forward = config({}, routing={"mode": "forward_all", "forward_auto_generated": True})
    (box,) = forward.mailboxes
    assert box.routing.mode is routing.RoutingMode.FORWARD_ALL
    assert box.routing.forward_auto_generated
    with pytest.raises(ConfigError, match=r"forward_auto_generated: is for mode: forward_all"):
        config({}, routing={"forward_auto_generated": True})
    with pytest.raises(ConfigError, match=r"routing\.mode: 'all' is not one of"):
        config({}, routing={"mode": "all"})
