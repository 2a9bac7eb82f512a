"""Training tools: the product catalogue generator, training the tiny extractor, and measuring
a model folder's extraction with the real engine."""
