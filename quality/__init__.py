"""Output quality: PII stripping, the evaluation pool, scoring, and evaluation runs."""
