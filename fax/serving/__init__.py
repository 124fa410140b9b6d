"""Serving: sampling, the KV-cache engine, continuous batching, text streaming, the OpenAI-compatible
HTTP server (``fax.serving.http``), batch inference (``fax.serving.infer``)."""
