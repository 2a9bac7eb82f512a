"""Output quality: PII stripping, the evaluation pool, scoring and a trainable tiny model."""
