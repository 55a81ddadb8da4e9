"""Evaluation: examples and data loading, images, tasks, prompts and metrics."""
