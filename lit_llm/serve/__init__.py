"""Serving: an OpenAI-compatible HTTP API (:mod:`lit_llm.serve.app`) over a continuous-batching engine
(:mod:`lit_llm.serve.engine`)."""
