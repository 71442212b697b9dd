"""Data: text sources, the split / packed / cached corpus, token batches, chat transcripts."""
