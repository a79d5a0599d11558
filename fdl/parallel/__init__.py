"""Data parallelism over local devices: sharded ``jit`` (primary) and ``pmap``."""

from fdl.parallel.data_parallel import (
    batch_sharding,
    data_mesh,
    make_pmap_eval_step,
    make_pmap_train_step,
    make_sharded_eval_step,
    make_sharded_train_step,
    replicate,
    replicate_on_mesh,
    replicated_sharding,
    shard_batch,
    split_batch,
    unreplicate,
)

__all__ = [
    "batch_sharding", "data_mesh", "make_pmap_eval_step", "make_pmap_train_step",
    "make_sharded_eval_step", "make_sharded_train_step", "replicate", "replicate_on_mesh",
    "replicated_sharding", "shard_batch", "split_batch", "unreplicate",
]
