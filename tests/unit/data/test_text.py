"""Text records for language models without Ray: rendering, parsing and its errors, the split, packing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from fabric.data import BUILTIN_CORPUS, pack_ids, parse_lines, parse_record, render_prompt
from fabric.data._text import heldout_mask


def test_instruction_prompt_has_the_input_line_only_when_there_is_an_input() -> None:
    assert render_prompt("Reverse the word.", "apple") == "<|user|>\nReverse the word.\napple\n<|assistant|>\n"
    assert render_prompt("What is 2 plus 2?") == "<|user|>\nWhat is 2 plus 2?\n<|assistant|>\n"
    assert render_prompt("What is 2 plus 2?", "") == render_prompt("What is 2 plus 2?")


def test_records_give_prompt_and_completion() -> None:
    record = {"instruction": "Name the capital city.", "input": "Peru", "output": "Lima"}
    assert parse_record(record, "instruction") == (render_prompt("Name the capital city.", "Peru"), "Lima")
    assert parse_record({"instruction": "Say hi.", "input": None, "output": "hi"}, "instruction")[0] == render_prompt(
        "Say hi."
    )
    assert parse_record({"body": "plain text", "id": 3}, "text", text_field="body") == ("plain text", "")


def test_bad_lines_are_reported_with_their_line_and_field() -> None:
    lines = [
        json.dumps({"instruction": "a", "output": "b"}),
        "",  # blank lines are skipped but still counted
        json.dumps({"instruction": 3, "output": "x"}),
        '{"instruction": "a", "output": ',
        json.dumps({"instruction": "a"}),
        json.dumps(["a", "b"]),
        json.dumps({"instruction": "  ", "output": "x"}),
        json.dumps({"instruction": "a", "input": 5, "output": "x"}),
    ]
    frame = parse_lines(lines, "instruction", file="f.jsonl")
    errors = dict(zip(frame["line"], frame["error"], strict=True))
    assert errors[1] == ""
    assert 2 not in errors
    assert errors[3] == "field 'instruction' must be a string, got int 3"
    assert errors[4].startswith("not valid JSON")
    assert errors[5] == "missing field 'output'"
    assert errors[6] == "not a JSON object (a list)"
    assert errors[7] == "field 'instruction' is empty"
    assert errors[8] == "field 'input' must be a string, got int 5"
    assert set(frame["file"]) == {"f.jsonl"}


def test_text_records_need_their_text_field() -> None:
    frame = parse_lines([json.dumps({"text": "hello"}), json.dumps({"content": "x"})], "text", text_field="text")
    assert list(frame["prompt"]) == ["hello", ""] and list(frame["error"]) == ["", "missing field 'text'"]


def test_heldout_split_is_seeded_by_content() -> None:
    frame = pd.DataFrame({"prompt": [f"p{i}" for i in range(2000)], "completion": ["c"] * 2000})
    mask = heldout_mask(frame, 0.1, seed=0)
    assert 0.07 < mask.mean() < 0.13
    # The same records are held out whatever their order; another seed holds out others.
    shuffled = frame.sample(frac=1.0, random_state=1)
    assert np.array_equal(heldout_mask(shuffled, 0.1, seed=0), mask[shuffled.index.to_numpy()])
    assert not np.array_equal(heldout_mask(frame, 0.1, seed=1), mask)


def test_packing_concatenates_and_cuts_fixed_blocks() -> None:
    blocks = pack_ids([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], seq_len=4)
    assert blocks.dtype == np.int64 and blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 9, 10 are the tail
    assert pack_ids([[1, 2]], seq_len=4).shape == (0, 4)


def test_the_embedded_corpus_is_clean_and_varied() -> None:
    lines = BUILTIN_CORPUS.read_text().splitlines()
    frame = parse_lines(lines, "instruction")
    assert len(frame) >= 300 and (frame["error"] == "").all()
    assert frame["prompt"].str.contains("Reverse the word").any() and frame["prompt"].str.contains("plus").any()
    assert frame["completion"].str.len().min() >= 1
