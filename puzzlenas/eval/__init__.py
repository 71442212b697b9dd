"""Evaluation: language-model metrics, downstream tasks, the report."""
