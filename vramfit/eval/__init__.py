"""Evaluation: speed benchmarks, perplexity and KL divergence."""
