"""llama.cpp as the serving engine's forward passes: the student's GGUF export, one llama.cpp sequence per slot.

Continuous batching stays the engine's (`engine.py`); this runner only turns its calls into `llama_decode`s on one
context whose KV cache holds `max_batch_size` sequences of `max_len` tokens each (not unified: each sequence owns
its share), so every running sequence advances in one batched decode, not one request after another as
llama.cpp's own server does with one slot. Newcomers' prompts go in one batch too (split at `n_batch` tokens),
with logits asked only at each prompt's last token. llama.cpp caches the latent and the rope key per token
(`deepseek2` with MLA keys, see pipeline/export/gguf_file.py). Calls go through ctypes, which releases the GIL, so
the event loop keeps answering while a step runs.

`gguf_for` exports the GGUF a student is served from once per student content and quantization, into the cache.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.serving.engine import EngineError


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def gguf_for(student_dir: str | Path, cache_dir: str | Path, quant: str) -> Path:
    """The student's GGUF at `quant`, exported once into `cache_dir`/gguf/<content hash> and reused."""
    from pipeline.artifacts import content_hash
    from pipeline.export import export

    folder = Path(cache_dir) / "gguf" / content_hash(Path(student_dir))[:16]
    path = folder / f"student-{quant}.gguf"
    return path if path.is_file() else export(student_dir, "gguf", folder, quant)  # type: ignore[arg-type]


class LlamaCppRunner:
    """Forward passes of a GGUF model in llama.cpp.

    Args:
        gguf_path: the model file.
        max_batch_size: sequences held at once (llama.cpp sequence ids 0..max_batch_size-1 are the slots).
        max_len: tokens per sequence.
        n_threads: CPU threads for llama.cpp; default every core this process may use.
    """

    name = "llama_cpp"

    def __init__(self, gguf_path: str | Path, max_batch_size: int, max_len: int, n_threads: int | None = None):
        import llama_cpp as lc

        # llama-cpp-python prints llama.cpp's log to stderr at or above its logger's level: errors only
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self._lc = lc
        lc.llama_backend_init()
        self.max_len, self.max_batch_size = max_len, max_batch_size
        self._model = lc.llama_model_load_from_file(str(gguf_path).encode(), lc.llama_model_default_params())
        if not self._model:
            raise EngineError(f"llama.cpp could not load {gguf_path}")
        params = lc.llama_context_default_params()
        threads = n_threads or len(os.sched_getaffinity(0))
        params.n_ctx = max_len * max_batch_size
        params.n_seq_max = max_batch_size
        params.kv_unified = False  # each sequence its own max_len tokens
        params.n_batch = params.n_ubatch = max(512, max_batch_size)
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # the KV cache in fp32, not llama.cpp's default fp16 (and so no flash attention, which converts it to fp16 on
        # a CPU): in fp16 the converted student's logits drift from ours by several units within 70 positions, and
        # its held-out pass@1 falls (docs/benchmarks.md, "Export fidelity")
        params.type_k = params.type_v = lc.GGML_TYPE_F32
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise EngineError(f"llama.cpp could not make a context of {params.n_ctx} tokens for {gguf_path}")
        self._memory = lc.llama_get_memory(self._ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        self.n_batch = int(params.n_batch)
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self._free = list(range(max_batch_size))
        self._length = [0] * max_batch_size  # tokens each slot holds

    def allocate(self) -> int:
        if not self._free:
            raise EngineError(f"llama.cpp context is full ({self.max_batch_size} sequences)")
        slot = self._free.pop(0)
        self._length[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self._lc.llama_memory_seq_rm(self._memory, slot, -1, -1)
        self._length[slot] = 0
        self._free.append(slot)
        self._free.sort()

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        return self._run(slots, prompts)

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        return self._run(slots, [[t] for t in tokens])

    def warm_up(self, max_batch_size: int) -> None:
        """One tiny decode, so the first client does not pay for llama.cpp's lazy set-up."""
        slot = self.allocate()
        try:
            self.prefill([slot], [[0]])
        finally:
            self.free(slot)

    def _run(self, slots: list[int], rows: list[list[int]]) -> torch.Tensor:
        """Append each row's tokens to its slot in batches of up to n_batch tokens; the logits at every row's last
        token, in row order (B, V)."""
        entries = []  # (slot, position, token, wants logits)
        for slot, tokens in zip(slots, rows, strict=True):
            start = self._length[slot]
            if start + len(tokens) > self.max_len:
                raise EngineError(f"slot {slot}: {start + len(tokens)} tokens exceed the context of {self.max_len}")
            entries += [(slot, start + i, t, i == len(tokens) - 1) for i, t in enumerate(tokens)]
        logits = []
        for first in range(0, len(entries), self.n_batch):
            chunk = entries[first : first + self.n_batch]
            batch = self._batch
            batch.n_tokens = len(chunk)
            for i, (slot, pos, token, last) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, last
                batch.seq_id[i][0] = slot
            if (rc := self._lc.llama_decode(self._ctx, batch)) != 0:
                raise EngineError(f"llama_decode failed ({rc})")
            for i, (_, _, _, last) in enumerate(chunk):
                if last:
                    pointer = self._lc.llama_get_logits_ith(self._ctx, i)
                    logits.append(
                        np.ctypeslib.as_array(
                            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)
                        ).copy()
                    )
        for slot, tokens in zip(slots, rows, strict=True):
            self._length[slot] += len(tokens)
        return torch.from_numpy(np.stack(logits))

    def close(self) -> None:
        if self._ctx:
            self._lc.llama_batch_free(self._batch)
            self._lc.llama_free(self._ctx)
            self._lc.llama_model_free(self._model)
            self._ctx = None
