"""Constrained decoding for `response_format`: json_object and json_schema.

A JSON schema is compiled into a tree of `Node`s, and a byte-level pushdown automaton walks the output
(`step(state, byte) -> state | None`); states are immutable tuples, so trying a candidate token costs
only its own bytes. Sampling stays the engine's: the constraint takes the sampler's choice when it
keeps the output a valid prefix, else the next-best candidates, and only when those all fail it masks
the whole vocabulary (tokens are grouped by first byte, so most are rejected with one step). Once the
value is complete it ends the turn with an end-of-generation token.

Supported schema keywords: type (and type lists), properties, required, additionalProperties, items,
enum, const, anyOf / oneOf (the first alternative that accepts a byte), $ref to $defs/definitions.
Property order is free; whitespace between tokens is bounded (a model cannot pad forever); string
formats, patterns, lengths and numeric ranges are not enforced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

WS = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
MAX_WS = 24  # structural whitespace bytes in a row
MAX_NUMBER = 24  # bytes in one number


class SchemaError(ValueError):
    pass


@dataclass(frozen=True)
class Node:
    """kind: any | object | array | string | number | integer | literal | union."""

    kind: str
    props: tuple[tuple[bytes, Node], ...] = ()  # JSON-escaped name bytes -> schema
    required: frozenset[bytes] = frozenset()
    extra: Node | None = None  # schema of other keys (None: no other keys)
    items: Node | None = None
    literals: tuple[bytes, ...] = ()
    options: tuple[Node, ...] = ()


ANY = Node("any")
ANY_OBJECT = Node("object", extra=ANY)
ANY_ARRAY = Node("array", items=ANY)
_SIMPLE = {
    "string": Node("string"),
    "number": Node("number"),
    "integer": Node("integer"),
    "boolean": Node("literal", literals=(b"true", b"false")),
    "null": Node("literal", literals=(b"null",)),
}


def compile_schema(schema: Any, root: Any = None, depth: int = 0) -> Node:
    """The automaton tree of a JSON schema (None or {} accept any JSON value)."""
    root = schema if root is None else root
    if schema is None or schema is True or schema == {} or depth > 12:
        return ANY
    if not isinstance(schema, dict):
        raise SchemaError(f"a schema must be an object, got {type(schema).__name__}")
    if "$ref" in schema:
        return compile_schema(_resolve(schema["$ref"], root), root, depth + 1)
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not values:
            raise SchemaError("enum is empty")
        return Node("literal", literals=tuple(json.dumps(v, ensure_ascii=False).encode() for v in values))
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return Node("union", options=tuple(compile_schema(s, root, depth + 1) for s in schema[key]))
    t = schema.get("type")
    if isinstance(t, list):
        return Node("union", options=tuple(compile_schema({**schema, "type": x}, root, depth + 1) for x in t))
    if t is None:
        t = "object" if "properties" in schema else "array" if "items" in schema else None
    if t == "object":
        return _object(schema, root, depth)
    if t == "array":
        return Node("array", items=compile_schema(schema.get("items"), root, depth + 1))
    if t in _SIMPLE:
        return _SIMPLE[t]
    if t is None:
        return ANY
    raise SchemaError(f"unsupported schema type {t!r}")


def _object(schema: dict, root: Any, depth: int) -> Node:
    props = schema.get("properties") or {}
    names = {k: json.dumps(k, ensure_ascii=False)[1:-1].encode() for k in props}
    compiled = tuple((names[k], compile_schema(v, root, depth + 1)) for k, v in props.items())
    extra = schema.get("additionalProperties", not props)
    extra_node = None if extra is False else compile_schema(None if extra is True else extra, root, depth + 1)
    required = frozenset(names[k] for k in schema.get("required", []) if k in names)
    return Node("object", props=compiled, required=required, extra=extra_node)


def _resolve(ref: str, root: Any) -> Any:
    if not ref.startswith("#/"):
        raise SchemaError(f"only local $ref are supported, got {ref!r}")
    node = root
    for part in ref[2:].split("/"):
        if not isinstance(node, dict) or part not in node:
            raise SchemaError(f"$ref {ref!r} does not resolve")
        node = node[part]
    return node


# -- the automaton --------------------------------------------------------------------------------------
# state = (stack, ws): stack is a tuple of frames, the last one active; () once the value is complete.
# frames: ("v", node)                      a value is expected
#         ("s", esc)                       inside a string (esc: 0 plain, 1 after "\", 2-5 \u digits)
#         ("k", node, buf, esc)            inside an object key
#         ("n", integer, phase, length)    inside a number
#         ("l", literals, pos)             inside a literal (true, false, null, enum values)
#         ("o", node, phase, seen, key)    an object: phase open | colon | value | after | need_key
#         ("a", node, phase)               an array: phase open | value | after | need_value

State = tuple


def start(node: Node) -> State:
    return ((("v", node),), 0)


def is_complete(state: State) -> bool:
    return state[0] == ()


def feed(state: State | None, data: bytes) -> State | None:
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def step(state: State, b: int) -> State | None:
    stack, ws = state
    if not stack:
        return None
    if b in WS and _ws_ok(stack[-1]):
        return (stack, ws + 1) if ws < MAX_WS else None
    new = _step(stack, b)
    return None if new is None else (new, 0)


def _ws_ok(frame: tuple) -> bool:
    kind = frame[0]
    return kind == "v" or (kind == "o" and frame[2] != "value") or (kind == "a" and frame[2] != "value")


def _step(stack: tuple, b: int) -> tuple | None:
    frame, rest = stack[-1], stack[:-1]
    return _HANDLERS[frame[0]](frame, rest, b)


def _done(stack: tuple) -> tuple:
    """The value on top of `stack` finished: tell its container."""
    if not stack:
        return ()
    top = stack[-1]
    if top[0] == "o":
        return stack[:-1] + (("o", top[1], "after", top[3], b""),)
    return stack[:-1] + (("a", top[1], "after"),)


def _value(frame: tuple, rest: tuple, b: int) -> tuple | None:
    node: Node = frame[1]
    kind = node.kind
    if kind == "union":
        for option in node.options:
            if (out := _value(("v", option), rest, b)) is not None:
                return out
        return None
    if kind == "any":
        if b == ord("{"):
            return _value(("v", ANY_OBJECT), rest, b)
        if b == ord("["):
            return _value(("v", ANY_ARRAY), rest, b)
        for simple in ("string", "number", "boolean", "null"):
            if (out := _value(("v", _SIMPLE[simple]), rest, b)) is not None:
                return out
        return None
    if kind == "object":
        return rest + (("o", node, "open", frozenset(), b""),) if b == ord("{") else None
    if kind == "array":
        return rest + (("a", node, "open"),) if b == ord("[") else None
    if kind == "string":
        return rest + (("s", 0),) if b == ord('"') else None
    if kind in ("number", "integer"):
        return _number(("n", kind == "integer", "start", 0), rest, b)
    return _literal(("l", node.literals, 0), rest, b)


def _string(frame: tuple, rest: tuple, b: int) -> tuple | None:
    esc = _string_byte(frame[1], b)
    if esc is None:
        return None
    if esc == -1:
        return _done(rest)
    return rest + (("s", esc),)


def _string_byte(esc: int, b: int) -> int | None:
    """Next escape state for byte b inside a string; -1 when b closes it; None when b is invalid."""
    if esc == 0:
        if b == ord('"'):
            return -1
        if b == ord("\\"):
            return 1
        return None if b < 0x20 else 0
    if esc == 1:
        if b == ord("u"):
            return 2
        return 0 if b in b'"\\/bfnrt' else None
    if b in b"0123456789abcdefABCDEF":
        return 0 if esc == 5 else esc + 1
    return None


def _key(frame: tuple, rest: tuple, b: int) -> tuple | None:
    _, node, buf, esc = frame
    obj = rest[-1]
    nxt = _string_byte(esc, b)
    if nxt is None:
        return None
    known = {name for name, _ in node.props}
    if nxt == -1:  # the key is complete
        if buf in obj[3] or (buf not in known and node.extra is None):
            return None
        return rest[:-1] + (("o", node, "colon", obj[3] | {buf}, buf),)
    buf += bytes([b])
    if node.extra is None and not any(n.startswith(buf) for n in known - obj[3]):
        return None
    return rest + (("k", node, buf, nxt),)


def _object_frame(frame: tuple, rest: tuple, b: int) -> tuple | None:
    _, node, phase, seen, key = frame
    if phase in ("open", "after") and b == ord("}"):
        return _done(rest) if node.required <= seen else None
    if phase in ("open", "need_key") and b == ord('"'):
        if node.extra is None and not {n for n, _ in node.props} - seen:
            return None
        return rest + (frame, ("k", node, b"", 0))
    if phase == "after" and b == ord(","):
        more = node.extra is not None or bool({n for n, _ in node.props} - seen)
        return rest + (("o", node, "need_key", seen, b""),) if more else None
    if phase == "colon" and b == ord(":"):
        child = dict(node.props).get(key, node.extra)
        return rest + (("o", node, "value", seen, key), ("v", child))
    return None


def _array(frame: tuple, rest: tuple, b: int) -> tuple | None:
    _, node, phase = frame
    if phase in ("open", "after") and b == ord("]"):
        return _done(rest)
    if phase == "after":
        return rest + (("a", node, "need_value"),) if b == ord(",") else None
    if phase in ("open", "need_value"):
        return _value(("v", node.items), rest + (("a", node, "value"),), b)
    return None


_NUMBER_NEXT = {
    "start": {"-": "sign", "0": "zero", "d": "int"},
    "sign": {"0": "zero", "d": "int"},
    "zero": {".": "dot", "e": "e"},
    "int": {"0": "int", "d": "int", ".": "dot", "e": "e"},
    "dot": {"0": "frac", "d": "frac"},
    "frac": {"0": "frac", "d": "frac", "e": "e"},
    "e": {"+": "esign", "-": "esign", "0": "exp", "d": "exp"},
    "esign": {"0": "exp", "d": "exp"},
    "exp": {"0": "exp", "d": "exp"},
}
_NUMBER_END = frozenset({"zero", "int", "frac", "exp"})


def _number(frame: tuple, rest: tuple, b: int) -> tuple | None:
    _, integer, phase, length = frame
    c = chr(b)
    key = "0" if c == "0" else "d" if b in DIGITS else "e" if c in "eE" else c
    nxt = _NUMBER_NEXT[phase].get(key)
    if nxt in ("dot", "e", "esign") and integer:
        nxt = None
    if nxt is not None and length < MAX_NUMBER:
        return rest + (("n", integer, nxt, length + 1),)
    if phase in _NUMBER_END:  # b ends the number and belongs to the container
        parent = _done(rest)
        return None if not parent else _step(parent, b) if b not in WS or not _ws_ok(parent[-1]) else parent
    return None


def _literal(frame: tuple, rest: tuple, b: int) -> tuple | None:
    _, literals, pos = frame
    going = tuple(lit for lit in literals if len(lit) > pos and lit[pos] == b)
    if going:
        if all(len(lit) == pos + 1 for lit in going):
            return _done(rest)
        return rest + (("l", going, pos + 1),)
    if any(len(lit) == pos for lit in literals):  # a shorter literal ended; b belongs to the container
        parent = _done(rest)
        return None if not parent else _step(parent, b)
    return None


_HANDLERS = {
    "v": _value,
    "s": _string,
    "k": _key,
    "o": _object_frame,
    "a": _array,
    "n": _number,
    "l": _literal,
}


def finished_value(state: State) -> bool:
    """Complete, or a top-level number/literal that could end here."""
    stack = state[0]
    if not stack:
        return True
    if len(stack) == 1 and stack[0][0] == "n":
        return stack[0][2] in _NUMBER_END
    return False


# -- the sampler side -----------------------------------------------------------------------------------


class Vocabulary:
    """Token bytes of a tokenizer, grouped by first byte (built once per model)."""

    def __init__(self, tokenizer: Any):
        n = tokenizer.vocab_size
        self.bytes: list[bytes] = []
        groups: dict[int, list[int]] = {}
        for t in range(n):
            data = b"" if tokenizer.is_control(t) else tokenizer.token_bytes(t)
            self.bytes.append(data)
            if data:
                groups.setdefault(data[0], []).append(t)
        self.groups = {k: torch.tensor(v, dtype=torch.long) for k, v in groups.items()}
        eot = sorted(tokenizer.eot_ids)
        self.end = tokenizer.eos_id if tokenizer.eos_id in tokenizer.eot_ids else eot[0]
        self.n = n


class JsonConstraint:
    """Keeps one generation inside a schema. `choose(logits, sampler)` returns the token to emit."""

    def __init__(self, node: Node, vocab: Vocabulary, tries: int = 32):
        self.state: State = start(node)
        self.vocab, self.tries = vocab, tries

    def valid(self, tok: int) -> State | None:
        data = self.vocab.bytes[tok] if tok < self.vocab.n else b""
        return feed(self.state, data) if data else None

    def choose(self, logits: torch.Tensor, sampler: Any) -> int:
        if finished_value(self.state):
            return self.vocab.end
        tok = self._first_valid(logits, sampler)
        if tok is None:
            mask = self._mask()
            if not mask.any():
                return self.vocab.end  # nothing can continue (cannot happen for a satisfiable schema)
            masked = torch.where(mask, logits, torch.tensor(float("-inf")))
            tok = sampler.pick(masked)
        self.state = self.valid(tok)
        return tok

    def _first_valid(self, logits: torch.Tensor, sampler: Any) -> int | None:
        logits = logits.clone()
        for _ in range(self.tries):
            tok = sampler.pick(logits)
            if self.valid(tok) is not None:
                return tok
            logits[tok] = float("-inf")
            if torch.isinf(logits).all():
                return None
        return None

    def _mask(self) -> torch.Tensor:
        mask = torch.zeros(self.vocab.n, dtype=torch.bool)
        for first, ids in self.vocab.groups.items():
            if step(self.state, first) is None:
                continue
            ok = [int(t) for t in ids if self.valid(int(t)) is not None]
            mask[ok] = True
        return mask
