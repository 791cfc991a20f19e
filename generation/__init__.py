"""Stepwise generation: datasets, answer checking, features, costs, LLM backends, trace trees.

Heavy clients (vLLM, the OpenAI SDK's network calls) are imported lazily inside the backends.
"""
