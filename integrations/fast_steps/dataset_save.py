"""`datasets.Dataset.save_to_disk(num_proc=1)` without a process pool.

datasets 4.x starts a `spawn` process pool for any `num_proc >= 1`, so even one worker is a
fresh Python process that imports the caller's `__main__` again: under `axolotl train` that is
Axolotl, torch and transformers, seconds per save, and Axolotl saves the prepared training and
evaluation sets through it on every first run of a recipe. With `num_proc=1` the same shards
are written by the calling process instead (datasets' own `num_proc=None` path): same files,
no pool.
"""

from __future__ import annotations

import functools

MARK = "_fast_steps_in_process"


def save_in_process() -> bool:
    """Install the wrapper (idempotent); True when it is in place."""
    from datasets import Dataset

    current = Dataset.save_to_disk
    if getattr(current, MARK, False):
        return True

    @functools.wraps(current)
    def save_to_disk(self, dataset_path, *args, num_proc=None, **kwargs):
        return current(self, dataset_path, *args,
                       num_proc=None if num_proc == 1 else num_proc, **kwargs)

    setattr(save_to_disk, MARK, True)
    Dataset.save_to_disk = save_to_disk
    return True
