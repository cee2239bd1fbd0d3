"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn: the `serve` extra), and its
Ray Serve deployment (`serving/ray.py`, the `ray` extra). Nothing here is imported by `import epic_ort`."""
