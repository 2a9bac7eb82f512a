"""Background upkeep of the queues: the reconciler re-sends what the transport lost."""
