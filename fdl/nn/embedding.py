"""Embedding (lookup table) layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fdl.nn import initializers as inits
from fdl.nn.core import Layer, ShapeError, check_positive_int
from fdl.nn.matmul import matmul

__all__ = ["embedding", "attend_embedding"]


def embedding(
    num_embeddings: int,
    features: int,
    *,
    w_init: inits.Initializer | None = None,
    dtype=jnp.float32,
) -> Layer:
    """Look up rows of a table: integer input ``(N, ...)`` -> ``(N, ..., features)``.

    Params ``{"table": (num_embeddings, features)}``, ``w_init`` defaulting to ``normal(1.0)``
    (PyTorch's ``nn.Embedding``). Floating or boolean input is refused with a
    :class:`~fdl.nn.core.ShapeError` (a ``ValueError``) — cast token ids to an integer dtype.

    Out-of-range indices: when the indices are concrete (an eager call), any index outside
    ``[0, num_embeddings)`` raises ``ValueError``. Under ``jit`` they cannot be checked; JAX
    then *clamps* them into range (negative -> row 0, too large -> the last row) instead of
    failing as PyTorch does, so validate token ids in the data pipeline.
    """
    check_positive_int("embedding", "num_embeddings", num_embeddings)
    check_positive_int("embedding", "features", features)
    w_init = w_init or inits.normal(1.0)

    def init(key, in_shape):
        if len(in_shape) < 1:
            raise ShapeError("embedding", f"expected integer input of rank >= 1, got {in_shape}")
        params = {"table": w_init(key, (num_embeddings, features), dtype)}
        return (*tuple(in_shape), features), params, {}

    def apply(params, state, x, *, key=None, train=False):
        table = params["table"]
        x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ShapeError(
                "embedding",
                f"expected integer indices, got dtype {x.dtype} with shape {x.shape}; "
                "cast token ids with .astype(jnp.int32)",
            )
        if not isinstance(x, jax.core.Tracer) and x.size:
            xn = np.asarray(x)
            lo, hi = int(xn.min()), int(xn.max())
            if lo < 0 or hi >= table.shape[0]:
                raise ValueError(
                    f"embedding: indices must lie in [0, {table.shape[0]}), got values in "
                    f"[{lo}, {hi}]"
                )
        return jnp.take(table, x, axis=0, mode="clip"), state

    return Layer(
        init, apply, name="embedding",
        config={"num_embeddings": num_embeddings, "features": features},
    )


def attend_embedding() -> Layer:
    """Logits against an embedding table: ``x (..., features) -> x @ table.T (..., num)``.

    Meant as a tie, ``nn.shared("embed", nn.attend_embedding())``: the output projection reuses
    the embedding's ``{"table": (num_embeddings, features)}`` (weight tying, as BERT's MLM
    decoder and tied language models do; Flax's ``Embed.attend``). Used alone it owns nothing
    and needs a table passed as its params.
    """

    def init(key, in_shape):  # pragma: no cover - only meaningful as a tie
        raise ShapeError("attend_embedding", "use it as nn.shared(<embedding path>, "
                         "nn.attend_embedding()): it has no table of its own")

    def apply(params, state, x, *, key=None, train=False):
        table = params["table"]
        if x.shape[-1] != table.shape[1]:
            raise ShapeError("attend_embedding",
                             f"expected input (..., {table.shape[1]}), got shape {x.shape}")
        return matmul(x, table.astype(x.dtype), transpose_w=True), state

    return Layer(init, apply, name="attend_embedding")
