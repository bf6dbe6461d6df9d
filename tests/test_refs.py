"""signery.refs.KeyRef: the one rule telling an id from a name."""

from __future__ import annotations

import uuid

import pytest

from signery.refs import KeyRef


def test_a_uuid_is_an_id_and_still_a_name() -> None:
    text = str(uuid.uuid4())
    ref = KeyRef.parse(text)
    assert ref.is_id
    assert ref.id == text
    assert ref.name == text
    assert ref.matches_id(text)
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    [
        "release-key",
        "",
        "0E984725-C51C-4BF4-9960-E1C80E27ABA0",  # the server writes lowercase ids
        "0e984725c51c4bf49960e1c80e27aba0",  # without hyphens
        "0e984725-c51c-4bf4-9960-e1c80e27aba0\n",  # a trailing newline is not an id
        " 0e984725-c51c-4bf4-9960-e1c80e27aba0",
        "1234567890",  # a TSG id is not a key id
    ],
)
def test_anything_else_is_a_name(text: str) -> None:
    ref = KeyRef.parse(text)
    assert not ref.is_id
    assert ref.id is None
    assert ref.name == text
    assert not ref.matches_id(text)


def test_is_a_frozen_value() -> None:
    ref = KeyRef.parse("a")
    assert ref == KeyRef.parse("a")
    assert hash(ref) == hash(KeyRef.parse("a"))
    with pytest.raises(AttributeError):
        ref.text = "b"  # type: ignore[misc]
