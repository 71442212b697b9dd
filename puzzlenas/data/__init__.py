"""Data: where text comes from and how it becomes token rows, in reading order:

- ``specs``: the source strings in ``data.sources`` (parsed, mixtures expanded);
- ``config``: ``DataConfig`` (torch-free: reading a YAML imports only these two);
- ``sources``: documents of each source (embedded corpora, local files, Hugging Face);
- ``tokenizer``: ids, EOS and fingerprint of any tokenizer;
- ``corpus``: split by document, tokenize, pack, cache (``build_dataset``);
- ``batches``: token budgets over packed rows (``token_batches``);
- ``chat``: the parent's chat transcripts as extra GKD rows;
- ``teacher``: text the parent writes (``teacher:`` sources), added to the train split.
"""
