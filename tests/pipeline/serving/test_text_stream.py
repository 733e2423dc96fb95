"""Incremental detokenization with OpenAI stop strings, on the real tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pipeline.serving.text_stream import TextStream


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    return AutoTokenizer.from_pretrained(str(teacher_dir))


def released(tokenizer, text: str, stops: list[str]) -> tuple[list[str], bool, str]:
    stream = TextStream(tokenizer, stops, {tokenizer.eos_token_id})
    pieces, hit = [], False
    for token in [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]:
        delta, hit = stream.add(token)
        pieces.append(delta)
        if hit:
            break
    if not hit:
        pieces.append(stream.flush())
    return pieces, hit, stream.text


def test_without_stops_the_pieces_add_up_to_the_text(tokenizer):
    text = "The answer is 42. Héllo wörld ✓ done"
    pieces, hit, whole = released(tokenizer, text, [])
    assert "".join(pieces) == whole == text and not hit
    assert sum(bool(p) for p in pieces) > 5  # released as it goes, not at the end


def test_a_stop_string_cuts_the_text_before_it_even_across_tokens(tokenizer):
    text = "First line. The final answer is 7\n\nUser: more"
    pieces, hit, whole = released(tokenizer, text, ["\n\nUser:", "never"])
    assert hit and "".join(pieces) == whole == "First line. The final answer is 7"


def test_text_that_might_start_a_stop_string_is_held_back_then_released(tokenizer):
    text = "a END b ENDX c"
    pieces, hit, whole = released(tokenizer, text, ["ENDX"])
    assert hit and "".join(pieces) == whole == "a END b "
    assert not any("ENDX" in p for p in pieces)
