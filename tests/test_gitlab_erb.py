"""The Helm chart's ERB, evaluated without Ruby: what Ruby would render, and nothing else run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom.gitlab.erb import ErbError, render


def test_the_charts_expressions_render_as_ruby_renders_them(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text('\t pa"ss:wo\\rd/ü%@\n\n')
    text = (
        f':password: <%= File.read("{secret}").strip.to_json %>\n'
        f":url: redis://:<%= ERB::Util::url_encode(File.read('{secret}').strip) %>@h:6379\n"
        f':chomped: "<%= File.read("{secret}").chomp %>"\n'
        ':env: <%= ENV["NAME"] %>|<%= ENV.fetch("UNSET", "fallback") %>|<%= ENV["UNSET"] %>|\n'
        ":other: <%= ERB::Util.url_encode(ENV.fetch('NAME')) %><%# a comment %> <%% literal\n"
    )
    rendered = render(text, {"NAME": "a b"})
    assert ':chomped: "\t pa"ss:wo\\rd/ü%@\n"\n' in rendered  # one line end taken off
    lines = rendered.splitlines()
    assert lines[0] == ':password: "pa\\"ss:wo\\\\rd/ü%@"'  # JSON: / and ü as they are
    assert json.loads(lines[0].split(": ", 1)[1]) == 'pa"ss:wo\\rd/ü%@'
    assert lines[1] == ":url: redis://:pa%22ss%3Awo%5Crd%2F%C3%BC%25%40@h:6379"
    assert lines[4] == ":env: a b|fallback||"
    assert lines[5] == ":other: a%20b <% literal"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a\n<% if true %>x<% end %>", "line 2: ERB code (<% ... %>) that mailroom does not run"),
        ("<%= `id` %>", "line 1: <%= `id` %> is not one mailroom evaluates"),
        ('<%= ENV.fetch("E", "x").strip.upcase %>', "is not an expression mailroom evaluates"),
        ('<%= File.read("/nonexistent/x") %>', 'File.read("/nonexistent/x"): No such file'),
        ('<%= ENV["UNSET"].strip %>', ".strip of an unset ENV variable"),
        ('<%= ENV.fetch("UNSET") %>', "ENV.fetch('UNSET'): the variable is not set"),
        ('<%= "#{x}" %>', "is not one mailroom evaluates"),  # interpolation runs code
        ("<%= 1 -%>", "ERB code"),
        ("x <%= open", "line 1: <% without a closing %>"),
    ],
)
def test_anything_else_is_refused_naming_its_line(text: str, expected: str) -> None:
    with pytest.raises(ErbError) as raised:
        render(text, {})
    assert expected in str(raised.value)


def test_a_secret_read_is_never_in_an_error(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("hunter2")
    with pytest.raises(ErbError) as raised:
        render(f'<%= File.read("{secret}").strip.reverse %>', {})
    assert "hunter2" not in str(raised.value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="<%=>#\"'()[].,:_ \nEFNVRBUTilreadstripchomptojsonfetch", max_size=200))
def test_any_text_renders_or_is_refused(text: str) -> None:
    try:
        out = render(text, {"E": "v"})
    except ErbError as exc:
        assert str(exc).startswith("line ")
    else:
        assert isinstance(out, str)
