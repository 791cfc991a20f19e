"""The embedded default's models: a procedural arithmetic task, two tiny Qwen2-layout LMs, their
in-process engine, the stand-in PRM and judge, training and Hugging Face export. May import:
backends (the interface), traces (problems, features), jaxroute."""
