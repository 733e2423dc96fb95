"""Serving the student over HTTP, no Ray in here: engine.py (continuous batching on the latent KV cache),
protocol.py (OpenAI request bodies and errors), api.py (request handling + the FastAPI app), source.py (which model:
registry alias, version or local directory). `actors/server.py` runs the app as a Ray Serve deployment."""
