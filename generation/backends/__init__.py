"""Backends: the one interface (`base`), what a generation costs (`costs`), and the vLLM and
OpenAI-compatible implementations (with the OpenAI client's retry policy and response cache).
May import: jaxroute only."""
