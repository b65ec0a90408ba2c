"""Runtime: tokenizer, chat templates, sampling, generation."""
