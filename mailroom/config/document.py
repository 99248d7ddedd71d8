"""YAML text → plain values, where every error names the dotted path and never the value.

A config file holds secrets, and YAML has ways to turn a careless one into an error: a password
starting with ``*`` is an alias, with ``!`` a tag, ``2024-13-01`` a date that does not exist,
``!!int x`` a number that is not. PyYAML's own messages (and tracebacks) quote the offending
text; here each becomes a ``ConfigError`` that says where (``mailboxes[0].password``, line and
column) and what to do, with nothing of the value. A value YAML cannot construct is kept as an
``Invalid`` marker while the document is read, then reported with its path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from mailroom.errors import ConfigError
from mailroom.redact import key_name

__all__ = ["Invalid", "load", "walk"]


_UNDEFINED_ALIAS = "tag:mailroom,2024:undefined-alias"
_QUOTED = re.compile(r"""\s*(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
# What may stay of a quoted part: YAML's token names and one or two punctuation characters.
_TOKEN = re.compile(r"""\s*['"](?:<[a-z ]+>|[^\w\s'"]{1,2})['"]""")
_YAML_TAG = "tag:yaml.org,2002:"
_WHAT_TAG = {
    "timestamp": "YAML reads it as a date, but there is no such date",
    "int": "YAML reads it as a whole number (!!int), but it is not one",
    "float": "YAML reads it as a number (!!float), but it is not one",
    "bool": "YAML reads it as true/false (!!bool), but it is neither",
    "binary": "YAML reads it as base64 (!!binary), but it is not valid base64",
}


def _expanded_size(root: Any) -> int:
    """How many values ``root`` stands for once every alias is expanded (each node counted
    once per reference), computed once per node; ``YamlBomb`` beyond the bound or on a cycle."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:  # iterative: a deep document costs no stack frames here
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = _children(node)
        if not children_done:
            if key in busy:
                raise YamlBomb("an alias refers to the value that holds it; write it out")
            busy.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        busy.discard(key)
        size = 1 + sum(sizes[id(child)] for child in children)
        if size > MAX_EXPANDED_NODES:
            raise YamlBomb(
                f"its aliases (*name) expand it to more than {MAX_EXPANDED_NODES} values; "
                "write the values out, or use fewer aliases"
            )
        sizes[key] = size
    return sizes[id(root)]


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


@dataclass(frozen=True, slots=True)
class Invalid:
    """A value YAML could not construct; ``reason`` says why without repeating it."""

    reason: str
    line: int


# What a document may expand to through its aliases: GitLab's files merge a section or two
# (``<<: *base``); nine levels of ten aliases each ("billion laughs") make 10^9 values out of
# a few hundred bytes, and every walk over them would take that long (issue 18).
MAX_EXPANDED_NODES = 1_000_000


class YamlBomb(yaml.YAMLError):
    """A document whose aliases expand beyond ``MAX_EXPANDED_NODES``, or refer to themselves."""


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` that keeps going where a value cannot be constructed (an ``Invalid``
    instead), so that the error can name the path of that value, and refuses a document whose
    aliases would expand it beyond ``MAX_EXPANDED_NODES`` values (``YamlBomb``)."""

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node)
        return node

    def compose_node(self, parent: Any, index: Any) -> Any:
        # An alias whose anchor is not defined: `password: *Secret` (a password starting
        # with *). A placeholder node, so that the path is known when it is reported.
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            if event.anchor not in self.anchors:
                self.get_event()  # type: ignore[no-untyped-call]
                return yaml.ScalarNode(_UNDEFINED_ALIAS, "", event.start_mark, event.end_mark)
        return super().compose_node(parent, index)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        if node in self.constructed_objects:
            return self.constructed_objects[node]
        nested = node in self.recursive_objects
        deep_before = self.deep_construct
        try:
            return super().construct_object(node, deep)
        except Exception as exc:
            # Constructors raise what they meet, with the value in the message: int('Secret'),
            # an unknown tag '!Secret', AttributeError from !!timestamp Secret. Keep neither,
            # only what kind of value it was meant to be.
            self.deep_construct = deep_before
            invalid = Invalid(_reason(node, exc), node.start_mark.line + 1)
            if not nested:
                self.recursive_objects.pop(node, None)
                self.constructed_objects[node] = invalid
            return invalid


def _reason(node: Any, exc: Exception) -> str:
    tag = str(node.tag)
    if tag == _UNDEFINED_ALIAS:
        return "starts with * (a YAML alias), but no &anchor of that name exists"
    if tag.startswith(_YAML_TAG) and (what := _WHAT_TAG.get(tag.removeprefix(_YAML_TAG))):
        return what
    if isinstance(exc, ConstructorError) and "could not determine a constructor" in str(exc):
        return "starts with ! (a YAML tag) that mailroom does not know"
    return "YAML cannot read this value"


def load(text: str, name: str) -> Any:
    """The YAML document in ``text`` (from file ``name``) as plain values, or ``ConfigError``."""
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        raise ConfigError(
            "", f"{name}, line {line}: a control character YAML does not allow; remove it"
        ) from None
    try:
        data = loader.get_single_data()
    except YamlBomb as exc:
        raise ConfigError("", f"{name}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise _syntax_error(text, name, exc, mark) from None
    except yaml.YAMLError as exc:  # none but the above is known; never the text of one
        raise ConfigError(
            "", f"{name}: not YAML mailroom can read ({type(exc).__name__})"
        ) from None
    except RecursionError:
        raise ConfigError("", f"{name}: nested too deeply to be a mailroom config") from None
    finally:
        loader.dispose()
    for path, value in walk(data):
        if isinstance(value, Invalid):
            raise ConfigError(
                path, f"{value.reason} ({name}, line {value.line}); put the value in quotes"
            )
    return data


def _syntax_error(text: str, name: str, exc: yaml.MarkedYAMLError, mark: Any) -> ConfigError:
    # PyYAML quotes what it found ("found undefined alias 'Secret'", "found unknown escape
    # character 'q'"): drop every quoted part, it may be a piece of a secret.
    parts = [exc.context, exc.problem]
    problem = ", ".join(_without_quotes(p) for p in parts if p) or "invalid YAML"
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    opened = exc.context_mark if _unclosed(exc) else None
    if opened is not None and mark is not None and opened.line != mark.line:
        # An unclosed [ { or quote is found where the document goes on (or ends), often far
        # below: the path and line where it was opened are the ones to look at.
        where = (
            f", line {opened.line + 1}, column {opened.column + 1} where it opens; YAML gave up "
            f"at line {mark.line + 1}, column {mark.column + 1}"
        )
        mark = opened
    path = _path_at(text, mark.index if mark is not None else None)
    return ConfigError(path, f"{problem} ({name}{where}); fix the YAML syntax")


def _unclosed(exc: yaml.MarkedYAMLError) -> bool:
    """Whether the error's context is something opened and never closed (a flow collection, a
    quoted scalar): what to point at is where it began, not where the parser gave up."""
    context = exc.context or ""
    return exc.context_mark is not None and ("flow" in context or "quoted scalar" in context)


def _without_quotes(text: str) -> str:
    return _QUOTED.sub(lambda m: m.group() if _TOKEN.fullmatch(m.group()) else "", text)


class _Frame:
    """A mapping or a sequence being read by ``_path_at``."""

    def __init__(self, mapping: bool) -> None:
        self.mapping = mapping
        self.key: str | None = None  # mapping: the key being read
        self.value_next = False  # mapping: the node being read is the value of ``key``
        self.key_open = False  # mapping: a collection used as a key is being read
        self.index = -1  # sequence: the item being read

    def started(self, text: str | None) -> None:
        """A node started in this collection: a scalar (``text``) or a collection (None)."""
        if not self.mapping:
            self.index += 1
        elif self.value_next:
            self.value_next = text is None  # a collection value stays open until it ends
        elif text is None:
            self.key_open = True
        else:
            self.key, self.value_next = key_name(text), True

    def ended(self) -> None:
        """A collection in this one ended."""
        if self.mapping:
            self.value_next = self.key_open
            if self.key_open:
                self.key, self.key_open = "?", False

    def segment(self) -> str:
        if self.mapping:
            return f".{self.key}" if self.value_next and self.key is not None else ""
        return f"[{self.index}]" if self.index >= 0 else ""


def _path_at(text: str, index: int | None) -> str:
    """The dotted path of what YAML was reading at character ``index``, or where it stops
    reading (a syntax error): the parser's events, followed up to there."""
    loader = yaml.SafeLoader(text)
    frames: list[_Frame] = []
    try:
        while loader.check_event():
            event = loader.peek_event()  # type: ignore[no-untyped-call]
            if index is not None and event.start_mark.index >= index:
                if isinstance(event, yaml.NodeEvent) and frames and not frames[-1].mapping:
                    frames[-1].index += 1  # the item that starts there
                break
            loader.get_event()  # type: ignore[no-untyped-call]
            if isinstance(event, yaml.CollectionEndEvent):
                frames.pop()
                if frames:
                    frames[-1].ended()
            elif isinstance(event, yaml.NodeEvent):
                collection = isinstance(event, yaml.CollectionStartEvent)
                if frames:
                    scalar = event.value if isinstance(event, yaml.ScalarEvent) else "?"
                    frames[-1].started(None if collection else scalar)
                if collection:
                    frames.append(_Frame(isinstance(event, yaml.MappingStartEvent)))
    except yaml.YAMLError:
        pass
    finally:
        loader.dispose()
    return "".join(frame.segment() for frame in frames).removeprefix(".")


def walk(data: Any) -> Iterator[tuple[str, Any]]:
    """Every value of the document with its dotted path, each container once (aliases may
    share one, or make it contain itself)."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        yield path, value
        if isinstance(value, dict | list):
            if id(value) in seen:
                continue
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            children = [(_join(path, key, isinstance(value, list)), item) for key, item in items]
            stack.extend(reversed(children))


def _join(path: str, key: Any, index: bool) -> str:
    if index:
        return f"{path}[{key}]"
    name = key_name(key)
    return f"{path}.{name}" if path else name
