"""Live routing: the online engine, routing rules, RSD's reward model and SpecReason's judge,
and the one live comparison. May import: backends, traces, tinylm, registry, jaxroute."""
