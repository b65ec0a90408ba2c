"""The JSON-schema automaton behind response_format, checked against Python's json module (the oracle
for what is JSON) and hand-written schema cases; and the token chooser on a toy vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vramfit.runtime.sampling import SamplingParams
from vramfit.server.constrain import (
    ANY,
    ANY_OBJECT,
    JsonConstraint,
    SchemaError,
    Vocabulary,
    compile_schema,
    feed,
    finished_value,
    is_complete,
    start,
)
from vramfit.server.serving import ApiSampler

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "pet": {"enum": ["cat", "dog", None]},
        "home": {"$ref": "#/$defs/place"},
        "nick": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
    "$defs": {"place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
}


def _accepts(node, text: str) -> bool:
    state = feed(start(node), text.encode())
    return state is not None and is_complete(state)


def _prefixes_ok(node, text: str) -> bool:
    data = text.encode()
    return all(feed(start(node), data[:i]) is not None for i in range(len(data) + 1))


scalars = st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.text(max_size=8)
scalars |= st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(json_values, st.sampled_from([None, 1]), st.booleans())
def test_any_accepts_every_json_document(value, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    if isinstance(value, int | float) and not isinstance(value, bool):
        # a top-level number never "closes"; it is finished where it may end
        state = feed(start(ANY), text.encode())
        assert state is not None and finished_value(state)
    else:
        assert _accepts(ANY, text), text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='{}[]",:0123456789.-eEtrufalsn \\x', max_size=14))
def test_what_the_automaton_completes_is_json(text):
    if _accepts(ANY, text):
        json.loads(text)


@pytest.mark.parametrize(
    "doc",
    [
        '{"name": "Ann", "age": 31}',
        '{"age": 31, "name": "Ann"}',  # any property order
        '{"name": "A\\"nn\\u00e9", "age": -2, "score": 1.5e3, "tags": ["x", "y"], "pet": null}',
        '{"name": "Ann", "age": 0, "pet": "dog", "home": {"city": "Oslo"}, "nick": null}',
        '{\n  "name": "Ann",\n  "age": 7,\n  "tags": []\n}',
        '{"name":"Ann","age":3,"nick":"Annie"}',
    ],
)
def test_schema_accepts(doc):
    assert _accepts(compile_schema(PERSON), doc)
    assert _prefixes_ok(compile_schema(PERSON), doc)


@pytest.mark.parametrize(
    "doc",
    [
        '{"name": "Ann"}',  # age is required
        '{"name": "Ann", "age": 3.5}',  # not an integer
        '{"name": "Ann", "age": "3"}',
        '{"name": "Ann", "age": 3, "extra": 1}',  # additionalProperties false
        '{"name": "Ann", "age": 3, "pet": "cow"}',  # not in the enum
        '{"name": "Ann", "age": 3, "name": "Bo"}',  # duplicate key
        '{"name": "Ann", "age": 3, "home": {}}',  # city required in $defs/place
        '{"name": "Ann", "age": 3, "tags": [1]}',
        '{"name": "Ann", "age": 3}x',  # nothing after the value
        '{"name": "Ann", "age": 3,}',
        '["name"]',
    ],
)
def test_schema_rejects(doc):
    assert not _accepts(compile_schema(PERSON), doc)


def test_whitespace_is_bounded():
    assert feed(start(ANY_OBJECT), b"{" + b" " * 24) is not None
    assert feed(start(ANY_OBJECT), b"{" + b" " * 25) is None


def test_bad_schemas():
    with pytest.raises(SchemaError):
        compile_schema({"type": "tuple"})
    with pytest.raises(SchemaError):
        compile_schema({"$ref": "#/$defs/missing"})


class ToyTokenizer:
    """Tokens: 0 <eos>, then pieces of JSON text (as in real vocabularies, every piece can be spelled)."""

    pieces = ["<eos>", "Hello", "{", '"a"', ":", " ", "1", "2", "}", '"b"', ",", "}\n", '"', "x", "a"]
    vocab_size = len(pieces)
    eos_id = 0
    eot_ids = frozenset({0})

    def is_control(self, t: int) -> bool:
        return t == 0

    def token_bytes(self, t: int) -> bytes:
        return self.pieces[t].encode()


def test_constraint_picks_the_best_valid_token_and_ends_the_turn():
    tok = ToyTokenizer()
    node = compile_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    sampler = ApiSampler(SamplingParams(temperature=0), constraint=JsonConstraint(node, Vocabulary(tok)))
    # what the "model" prefers, best first: Hello x }\n } 1 : "b" "a" 2 { , " (then " " and a)
    preference = torch.tensor([0.0, 9.0, 1.0, 2.0, 3.0, -1.0, 5.0, 1.5, 6.0, 2.5, 0.5, 7.0, 0.2, 8.0, -2.0])
    out = []
    for _ in range(10):
        out.append(sampler(preference, []))
        if out[-1] == 0:
            break
    # by hand: "{" is the only start; "a" the only key ("b" is not allowed, "}" needs "a"); ":"; "1";
    # "}" ("}\n" would put a byte after the finished value); then <eos>
    assert [tok.pieces[t] for t in out] == ["{", '"a"', ":", "1", "}", "<eos>"]


def test_constraint_with_sampling_stays_valid():
    tok = ToyTokenizer()
    node = compile_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    for seed in range(5):
        sampler = ApiSampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed),
                             constraint=JsonConstraint(node, Vocabulary(tok)))  # fmt: skip
        out = []
        while len(out) < 200 and (not out or out[-1] != 0):
            out.append(sampler(torch.zeros(tok.vocab_size), []))
        text = "".join(tok.pieces[t] for t in out[:-1])
        assert out[-1] == 0 and set(json.loads(text)) == {"a"}
