"""Incremental detokenization with stop sequences: streamed pieces never take text back."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.serve.llm.text import TextStream, find_stop, held_back


def test_held_back_is_the_longest_suffix_that_may_start_a_stop() -> None:
    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello", ("xyz",)) == 0
    assert held_back("ab", ("abc", "bz")) == 2
    assert held_back("anything", ()) == 0


def test_find_stop_finds_the_earliest() -> None:
    assert find_stop("a.b\nc", (".", "\n")) == 1
    assert find_stop("abc", ("x",)) == -1
    assert find_stop("a.b.c", (".",), start=2) == 3


@pytest.fixture(scope="module")
def tokenizer(tiny_run: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_run / "llm" / "base")


def test_pieces_add_up_to_the_decoded_text(tokenizer: object) -> None:
    text = "the cat sat on a mat near the quiet river bank — naïve café"
    ids = tokenizer(text)["input_ids"]  # type: ignore[operator]
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # half characters are held back, never shown


def test_text_ends_before_a_stop_sequence_even_across_tokens(tokenizer: object) -> None:
    text = "the cat sat on a mat while the dog ran"
    ids = tokenizer(text)["input_ids"]  # type: ignore[operator]
    stream = TextStream(tokenizer, ("a mat", "zzz"))
    pieces = []
    for i in ids:
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    assert stream.stopped
    assert "".join(pieces) == "the cat sat on "
    assert stream.flush() == ""
