"""Token budgets: serve packed rows as ``(B, seq_len)`` int64 batches until a budget is spent.

:func:`token_batches` repeats (and reshuffles) the split when the budget is larger than it,
warning with :class:`DataRepeatWarning`, and shards rows across distributed ranks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch


class DataRepeatWarning(UserWarning):
    """A token budget is larger than the split, so the split is repeated for several epochs."""


class TokenBatches:
    """Iterable of ``(B, seq_len)`` int64 tensors that serves a token budget.

    The budget is global (all ranks together): it is rounded up to whole rows and to a
    multiple of ``world_size`` rows, so every rank yields the same number of batches; the last
    batch may hold fewer than ``batch_size`` rows.  Rows are drawn from a stream of epochs,
    each a permutation of the split seeded by ``(seed, epoch)``.  At step ``t`` the global
    batch is the next ``world_size * b`` stream positions and rank ``r`` gets the ``r``-th
    block of ``b`` of them, so ranks see disjoint rows within an epoch and the union over ranks
    equals the single-process batch of size ``world_size * batch_size``.  Iteration is
    deterministic and can be repeated.
    """

    def __init__(self, rows: np.ndarray | torch.Tensor, batch_size: int, num_tokens: int,
                 seed: int = 0, *, rank: int = 0, world_size: int = 1,
                 _stacklevel: int = 2) -> None:
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] < 1:
            raise ValueError(f"rows must be a 2-D (N, seq_len) array, got shape {rows.shape}")
        for name, v, lo in (("batch_size", batch_size, 1), ("num_tokens", num_tokens, 1),
                            ("world_size", world_size, 1), ("rank", rank, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name}={v!r} is invalid: must be an int >= {lo}")
        if rank >= world_size:
            raise ValueError(f"rank={rank} is invalid: must be in [0, world_size={world_size})")
        if rows.shape[0] == 0:
            raise ValueError("the split has no rows: add data, lower seq_len, or raise its "
                             "fraction")
        self.rows = rows                      # (N, seq_len)
        self.num_rows, self.seq_len = rows.shape
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_tokens = int(num_tokens)
        global_rows = math.ceil(self.num_tokens / self.seq_len)
        self.global_rows = math.ceil(global_rows / self.world_size) * self.world_size
        self.rows_per_rank = self.global_rows // self.world_size
        self.tokens_served = self.global_rows * self.seq_len      # all ranks together
        self.epochs = self.global_rows / self.num_rows
        self._perms: dict[int, np.ndarray] = {}
        if self.global_rows > self.num_rows:
            warnings.warn(
                f"token budget {self.num_tokens:,} needs {self.global_rows:,} rows of "
                f"{self.seq_len} tokens but the split has {self.num_rows:,} rows "
                f"({self.num_rows * self.seq_len:,} tokens): repeating it over "
                f"{self.epochs:.2f} epochs ({math.ceil(self.epochs)} passes, reshuffled each "
                f"epoch with seed {self.seed})", DataRepeatWarning, stacklevel=_stacklevel)

    def __len__(self) -> int:
        """Batches this rank yields."""
        return math.ceil(self.rows_per_rank / self.batch_size)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, epoch])
            self._perms = {epoch: rng.permutation(self.num_rows)}  # keep one epoch in memory
        return self._perms[epoch]

    def _row_ids(self, positions: np.ndarray) -> np.ndarray:
        """Stream positions -> row indices (epoch = position // N, reshuffled per epoch)."""
        out = np.empty_like(positions)
        epochs = positions // self.num_rows
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self._perm(int(e))[positions[m] % self.num_rows]
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        for step in range(len(self)):
            b = min(self.batch_size, self.rows_per_rank - step * self.batch_size)
            start = step * self.batch_size * self.world_size + self.rank * b
            idx = self._row_ids(np.arange(start, start + b, dtype=np.int64))
            yield torch.from_numpy(self.rows[idx].astype(np.int64))  # (b, seq_len)


def token_batches(dataset_split: np.ndarray | torch.Tensor, batch_size: int, num_tokens: int,
                  seed: int = 0, *, rank: int = 0, world_size: int = 1) -> TokenBatches:
    """Serve ``num_tokens`` tokens (all ranks together) as ``(B, seq_len)`` int64 tensors.

    See :class:`TokenBatches`; warns with :class:`DataRepeatWarning` (stating the number of
    epochs) when the budget exceeds the split.
    """
    return TokenBatches(dataset_split, batch_size, num_tokens, seed, rank=rank,
                        world_size=world_size, _stacklevel=3)
