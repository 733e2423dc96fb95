"""Serving the student over HTTP, no Ray in here: engine.py (continuous batching over a forward runner: ours on
the latent KV cache, or llama_cpp_runner.py, llama.cpp on the student's GGUF export),
model_server.py (one replica's request handling), request_checks.py (a request checked against the deployment's
limits, and the engine sequences it becomes), responses.py (answers assembled from generation events, whole or
streamed), text_stream.py (detokenization with stop strings), protocol.py (OpenAI requests and errors),
openai_format.py (typed OpenAI responses, SSE chunks and each endpoint's shape), auth.py (the API key), app.py
(the FastAPI app), source.py (which model: registry alias, version or local directory).
`actors/server.py` runs the app as a Ray Serve deployment."""
