"""Evaluation: perplexity, zero-shot tasks (lm-eval), size and efficiency, reports."""
