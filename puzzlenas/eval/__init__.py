"""Evaluation, in reading order:

- ``config``: ``EvalConfig`` (torch-free);
- ``metrics``: perplexity, KL and agreement with the parent, greedy completions, retention;
- ``tasks/``: downstream tasks from held-out text, scored by log-likelihood like lm-eval;
- ``genres``: out-of-genre evaluation text; ``chat_quality``: how a child answers chat prompts
  (the fixed prompts in ``chat_prompts``);
- ``report``: the run's Markdown report and plots.
"""
