"""The embedded default: a procedural arithmetic task and two tiny JAX language models for it."""
