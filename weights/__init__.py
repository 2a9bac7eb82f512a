"""Model files on disk: where a configured model's folder is, the tiny model built offline,
and prompt token counts taken with the model's own tokenizer."""
