"""Downstream evaluation tasks from real text that installed packages ship, scored like
lm-evaluation-harness (log-likelihood of continuations, no generation).

A task is a list of :class:`Example` ``(context, choices, gold)``.  Two kinds:

* ``multiple_choice``: the summed log-likelihood of each choice given the context is computed;
  ``acc`` = the gold choice has the highest log-likelihood, ``acc_norm`` = the gold choice has
  the highest log-likelihood per *character* of the choice (lm-eval's ``acc_norm``; the
  leading space / newline that separates a choice from the context is not counted, as
  lm-eval keeps it in ``target_delimiter``).
* ``last_word`` (LAMBADA style, one choice): ``acc`` = every token of the gold word is the
  model's argmax given the prefix (greedy exact match); ``loglik`` = the word's mean
  log-likelihood.  ``acc_norm`` is ``None``.

Tasks (each built deterministically from a seed; ``max_examples`` caps the size):

==================== ====================================================================
``wiki-lastword``    held-out Wikipedia articles (gensim test data, the documents whose
                     split is "test" under the SAME document split as training,
                     :func:`puzzlenas.data.corpus.assign_split`): predict the last word of a
                     sentence from up to 60 preceding words.
``news-continuation`` 4-way choice of the next sentence of held-out ABC news articles;
                     distractors are sentences of other held-out articles.
``bible-continuation`` 4-way choice of the next verse of held-out King James chapters.
``mmlu-dev``         MMLU dev questions (57 subjects, 281 usable) as the ``lm-eval`` wheel
                     ships them inside its Flan chain-of-thought few-shot prompts
                     (``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``), asked
                     zero-shot in lm-eval's MMLU format with choices " A" .. " D".
==================== ====================================================================

Modules, in reading order: ``task`` (Example, Task), ``heldout`` and ``mmlu`` (the builders),
``registry`` (``build_task`` by name), ``loglik`` (lm-eval's log-likelihood requests, batched
for any causal LM), ``evaluate`` (``evaluate_tasks``, the eval stage's entry), ``harness``
(the same tasks run through lm-evaluation-harness).
"""

from .evaluate import evaluate_task, evaluate_tasks
from .harness import export_lm_eval_task, run_lm_eval_harness
from .heldout import (build_bible_continuation, build_news_continuation, build_wiki_lastword,
                      held_out_documents, split_sentences)
from .loglik import encode_pairs, loglikelihoods, score_token_requests
from .mmlu import build_mmlu_dev, mmlu_dev_path
from .registry import DEFAULT_TASKS, TASK_BUILDERS, TASK_NAMES, build_task
from .task import LAST_WORD, MULTIPLE_CHOICE, Example, Task

__all__ = [
    "DEFAULT_TASKS", "LAST_WORD", "MULTIPLE_CHOICE", "TASK_BUILDERS", "TASK_NAMES", "Example", "Task",
    "build_bible_continuation", "build_mmlu_dev", "build_news_continuation", "build_task",
    "build_wiki_lastword", "encode_pairs", "evaluate_task", "evaluate_tasks", "export_lm_eval_task",
    "held_out_documents", "loglikelihoods", "mmlu_dev_path", "run_lm_eval_harness",
    "score_token_requests", "split_sentences",
]
