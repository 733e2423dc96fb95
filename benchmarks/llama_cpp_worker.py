"""The llama.cpp side of `peers.LlamaCppDecoder`, run by the peers venv's Python (it imports llama_cpp, not us).

    python llama_cpp_worker.py MODEL.gguf THREADS   # then one JSON command per line on stdin, one reply per line

Commands: `info`; `prefill` (a fresh context holding `prompt`, token ids of the same tokenizer); `decode`
(`new_tokens` greedy steps continuing the latest prefill: argmax of the last logits, one token evaluated at a time,
no stop token). The timing is the caller's, around each command.
"""

from __future__ import annotations

import json
import sys

import llama_cpp
import numpy as np


def main() -> None:
    model, threads = sys.argv[1], int(sys.argv[2])
    llm, n_vocab = None, 0

    def load(n_ctx: int) -> llama_cpp.Llama:
        return llama_cpp.Llama(
            model, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "info":
                reply = {"version": llama_cpp.__version__}
            elif cmd["op"] == "prefill":
                if llm is None or llm.n_ctx() < cmd["n_ctx"]:
                    llm = load(max(cmd["n_ctx"], 512))
                    n_vocab = llm.n_vocab()
                llm.reset()
                llm.eval(cmd["prompt"])
                reply = {"n_tokens": llm.n_tokens}
            elif cmd["op"] == "decode":
                tokens = []
                for _ in range(cmd["new_tokens"]):
                    tokens.append(int(last_logits().argmax()))
                    llm.eval(tokens[-1:])
                reply = {"tokens": tokens}
            else:
                reply = {"error": f"unknown op {cmd['op']!r}"}
        except Exception as e:  # noqa: BLE001  (the caller raises it, with the worker's message)
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
