"""Log-probs from a remote teacher, turned into soft targets in a local vocabulary.

OpenAI-compatible servers name tokens by their text, not their ids: `top_logprobs` maps token strings to
log-probs. To train on them the strings must become ids of the student's tokenizer, which is the teacher's only
when the server tokenises text the same way. `TokenPieces` holds what every local id reads as; `align` lines a
server's echoed tokens up with a local token sequence (servers omit some special tokens, llama.cpp renders them
as ""), and `soft_targets` builds the same `SoftTargets` the local backends compute by a forward pass.

A string is read as the one local id whose bytes print as exactly that string; a token cut in the middle of a
UTF-8 character prints as its whole part, and a string that several whole tokens print as cannot be placed: its
probability joins the tail bucket. One exception: llama.cpp prints every special token as "", and the one special
token a completion holds is the end of turn, whose probability is what teaches a student to stop, so "" is read
as the tokenizer's end-of-turn token (when another ""-printing token is also in the server's top k, the two
collide in its JSON object and the value kept is the lower one). A row with fewer than k placed tokens is padded
with the rarest ids of the vocabulary (the last ones) at log-prob -inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.teacher.base import SoftTargets


class TokenPieces:
    """The text of every id of a local tokenizer, as a server prints it, and the ids a text stands for."""

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        self.special = frozenset(special)
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        byte_level = all(c in byte_of for t in tokens[:1000] if t for c in t)
        self.pieces: list[str] = []
        whole: list[bool] = []  # the token's bytes are whole UTF-8: nothing was dropped to print it
        for i, t in enumerate(tokens):
            if i in special or t is None:
                self.pieces.append(t or "")
                whole.append(True)
            elif byte_level and all(c in byte_of for c in t):
                # servers decode each token's bytes on their own and drop what is not whole UTF-8
                raw = bytes(byte_of[c] for c in t)
                self.pieces.append(raw.decode("utf-8", errors="ignore"))
                whole.append(len(self.pieces[-1].encode()) == len(raw))
            else:
                self.pieces.append(tokenizer.decode([i]))
                whole.append("\ufffd" not in self.pieces[-1])
        owners: dict[str, list[int]] = {}
        for i, p in enumerate(self.pieces):
            if whole[i]:
                owners.setdefault(p, []).append(i)
        # a text with one whole owner is that token ("Ġ" is " "; "Ġâ", a space and a byte cut off, prints so too)
        self.unique = {p: ids[0] for p, ids in owners.items() if len(ids) == 1 and p}
        if tokenizer.eos_token_id is not None:
            self.unique[""] = tokenizer.eos_token_id  # see the module docstring
        self.vocab_size = len(self.pieces)

    def reads_as(self, token_id: int, text: str) -> bool:
        """Whether a server's `text` for a token can be this id (special tokens may print as nothing)."""
        return self.pieces[token_id] == text or (token_id in self.special and text == "")

    def id_of(self, text: str) -> int | None:
        """The one local id this text stands for, or None when none or several do."""
        return self.unique.get(text)


class Misaligned(ValueError):
    """A server's tokens for a text are not the local tokenizer's."""


def align(ids: list[int], server_tokens: list[str], pieces: TokenPieces) -> dict[int, int]:
    """{local index: server entry} for every local token the server printed, in order.

    A local special token the server left out is skipped; so is an extra empty entry of the server's (a BOS it
    added). Any other difference means the two tokenisers differ here, and raises `Misaligned` naming it.
    """
    out: dict[int, int] = {}
    j = 0
    for i, token_id in enumerate(ids):
        while True:
            if j < len(server_tokens) and pieces.reads_as(token_id, server_tokens[j]):
                out[i] = j
                j += 1
                break
            if token_id in pieces.special:
                break  # the server left this special token out
            if j < len(server_tokens) and server_tokens[j] == "":
                j += 1  # one of the server's own special tokens
                continue
            got = server_tokens[j] if j < len(server_tokens) else "(end)"
            raise Misaligned(
                f"token {i} reads {pieces.pieces[token_id]!r} (id {token_id}) locally but {got!r} on the server"
            )
    return out


@dataclass
class EchoedLogprobs:
    """A completions response's `logprobs` with `echo`: per printed token, its text, its own log-prob, and the
    top-k (text -> log-prob) of the distribution it was drawn from (None for the first)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]


def soft_targets(
    ids: list[int], start: int, echoed: EchoedLogprobs, pieces: TokenPieces, top_k: int
) -> SoftTargets | None:
    """The teacher's top-k for tokens `start..len(ids)-1` of `ids` (row j: token start + j), as `HFTeacher.score`
    gives them; None when a completion token has no entry (the server left it out), so no row can be built."""
    where = align(ids, echoed.tokens, pieces)
    rows_ids, rows_lp, tails, own = [], [], [], []
    for i in range(start, len(ids)):
        j = where.get(i)
        if j is None or echoed.token_logprobs[j] is None or echoed.top_logprobs[j] is None:
            return None
        placed = {ids[i]: float(echoed.token_logprobs[j])}  # the token itself is known by id
        own.append(placed[ids[i]])
        for text, lp in echoed.top_logprobs[j].items():
            token_id = pieces.id_of(text)
            if token_id is not None and token_id not in placed:
                placed[token_id] = float(lp)
        best = sorted(placed.items(), key=lambda kv: -kv[1])[:top_k]
        covered = sum(math.exp(lp) for _, lp in best)
        pad = (t for t in range(pieces.vocab_size - 1, -1, -1) if t not in placed)
        best += [(next(pad), -math.inf) for _ in range(top_k - len(best))]
        rows_ids.append([t for t, _ in best])
        rows_lp.append([lp for _, lp in best])
        tails.append(math.log1p(-covered) if covered < 1.0 else -math.inf)
    return SoftTargets(
        np.asarray(rows_ids, np.int32),
        np.asarray(rows_lp, np.float32),
        np.asarray(tails, np.float32),
        np.asarray(own, np.float32),
    )
