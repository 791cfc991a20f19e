"""Trace trees and what they are made of: problems and datasets, answer checks, the step
verifier, step features, and resumable trace-tree generation. May import: backends, jaxroute."""
