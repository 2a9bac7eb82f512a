"""inferq: queue-driven asynchronous inference on your own models."""

__version__ = "0.1.0"
