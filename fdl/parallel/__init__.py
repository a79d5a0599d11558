"""Data parallelism over the devices of one or several processes: sharded ``jit`` (primary)
and ``pmap``; placement of host data on a mesh spanning processes (see :mod:`fdl.distributed`)."""

from fdl.distributed.placement import global_batch, is_multiprocess, process_rows, put_global
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
    shard_local_batch,
    split_batch,
    unreplicate,
)
from fdl.parallel.sync_batch_norm import sync_batch_norm, sync_moments

__all__ = [
    "batch_sharding", "data_mesh", "make_pmap_eval_step", "make_pmap_train_step",
    "make_sharded_eval_step", "make_sharded_train_step", "replicate", "replicate_on_mesh",
    "replicated_sharding", "shard_batch", "split_batch", "unreplicate", "shard_local_batch",
    "global_batch", "is_multiprocess", "process_rows", "put_global", "sync_batch_norm",
    "sync_moments",
]
