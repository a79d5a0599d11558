"""Character-level recurrent language model (d2l chapter 8/9): RNN, GRU or LSTM, deep and
optionally bidirectional (the book's counter-example: it sees the future, so its training
perplexity is misleadingly low and its generation is useless).

::

    loader, vocab = load_data_time_machine("../shared/data/timemachine.txt", 32, 35)
    model = RNNLM(len(vocab), 256, cell="gru")
    params = model.init(jax.random.key(0))
    params, history = train_rnn_lm(model, params, loader, num_epochs=500, lr=1.0)
    print(predict(model, params, "time traveller", 50, vocab))

Params: ``{"embed": {"table": (V, E)}`` (only with ``embed_size``), ``"rnn": {"l0": {"fwd":
...}}``, ``"out": {"w": (D*H, V), "b": (V,)}}``. Without ``embed_size`` the input is one-hot
(the book's setting).

Optimisation: SGD with gradient clipping by global norm (d2l's ``grad_clipping``: if the norm of
all gradients exceeds ``theta``, scale them to norm ``theta``), built from :mod:`fdl.optim`
(``chain(clip_by_global_norm(theta), sgd(lr))``) when it provides those names, else from an
equivalent local fallback.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdl.nn import recurrent as R

__all__ = ["RNNLM", "make_train_step", "perplexity", "predict", "sgd_with_clipping",
           "train_rnn_lm"]


@dataclasses.dataclass(frozen=True)
class RNNLM:
    """A recurrent LM: (one-hot | embedding) -> stacked RNN/GRU/LSTM -> dense to vocabulary."""

    vocab_size: int
    hidden_size: int = 256
    cell: str = "gru"
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    embed_size: int | None = None
    unroll: int = 1

    def __post_init__(self):
        if self.cell not in R.CELL_GATES:
            raise ValueError(f"RNNLM: cell must be one of {sorted(R.CELL_GATES)}, got "
                             f"{self.cell!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"RNNLM: vocab_size must be an integer >= 1, got "
                             f"{self.vocab_size!r}")

    @property
    def rnn(self) -> R.RecurrentLayer:
        make = {"rnn": R.rnn, "gru": R.gru, "lstm": R.lstm}[self.cell]
        return make(self.hidden_size, num_layers=self.num_layers, dropout=self.dropout,
                    bidirectional=self.bidirectional, unroll=self.unroll)

    def init(self, key, dtype=jnp.float32) -> dict:
        """Initial params (PyTorch-style uniform recurrent weights, ``nn.Linear``-style head)."""
        k_emb, k_rnn, k_w, k_b = jax.random.split(key, 4)
        params: dict[str, Any] = {}
        n_in = self.vocab_size
        if self.embed_size is not None:
            params["embed"] = {"table": jax.random.normal(
                k_emb, (self.vocab_size, self.embed_size), dtype)}
            n_in = self.embed_size
        _, params["rnn"], _ = self.rnn.init(k_rnn, (1, 1, n_in))
        n_out = self.hidden_size * (2 if self.bidirectional else 1)
        bound = 1.0 / math.sqrt(n_out)
        params["out"] = {
            "w": jax.random.uniform(k_w, (n_out, self.vocab_size), dtype, -bound, bound),
            "b": jax.random.uniform(k_b, (self.vocab_size,), dtype, -bound, bound),
        }
        return params

    def begin_state(self, batch_size: int, dtype=jnp.float32) -> Any:
        """Zero recurrent state for ``batch_size`` sequences."""
        return self.rnn.initial_state(batch_size, dtype)

    def apply(self, params: dict, tokens: jax.Array, state: Any = None, *, key=None,
              train: bool = False) -> tuple[jax.Array, Any]:
        """``tokens`` int (batch, steps) -> ``(logits (batch, steps, V), final_state)``."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"RNNLM: expected integer tokens of shape (batch, steps), got "
                             f"{tokens.dtype} {tokens.shape}")
        dtype = params["out"]["w"].dtype
        if "embed" in params:
            x = jnp.take(params["embed"]["table"], tokens, axis=0)
        else:
            x = jax.nn.one_hot(tokens, self.vocab_size, dtype=dtype)
        ys, state = self.rnn.apply_with_state(params["rnn"], x, state, key=key, train=train)
        logits = ys @ params["out"]["w"] + params["out"]["b"]
        return logits, state

    def loss(self, params: dict, tokens: jax.Array, targets: jax.Array, state: Any = None, *,
             key=None, train: bool = False) -> tuple[jax.Array, Any]:
        """Mean cross-entropy over all positions, and the final state."""
        logits, state = self.apply(params, tokens, state, key=key, train=train)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)
        return jnp.mean(nll), state


# ----------------------------------------------------------------------------- optimiser


def _local_sgd_with_clipping(lr: float, theta: float):
    def init(params):
        return ()

    def update(grads, opt_state, params=None):
        leaves = jax.tree_util.tree_leaves(grads)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves))
        scale = jnp.minimum(1.0, theta / jnp.maximum(norm, 1e-30))
        return jax.tree_util.tree_map(lambda g: -lr * scale * g, grads), opt_state

    return init, update


def sgd_with_clipping(lr: float = 1.0, theta: float = 1.0):
    """``(init, update)``: clip the gradient's global norm to ``theta``, then SGD with ``lr``.
    Uses :mod:`fdl.optim` when it exports ``chain``, ``clip_by_global_norm`` and ``sgd``."""
    try:
        from fdl.optim import chain, clip_by_global_norm, sgd
    except ImportError:
        return _local_sgd_with_clipping(lr, theta)
    tx = chain(clip_by_global_norm(theta), sgd(lr))
    return tx.init, tx.update


def _apply_updates(params, updates):
    return jax.tree_util.tree_map(lambda p, u: (p + u).astype(p.dtype), params, updates)


def make_train_step(model: RNNLM, lr: float = 1.0, theta: float = 1.0
                    ) -> tuple[Callable, Callable]:
    """``(opt_init, step)`` with the jitted ``step(params, opt_state, X, Y, state, key) ->
    (params, opt_state, loss, final_state)``. The returned state is detached
    (:func:`~fdl.nn.recurrent.detach_state`), ready to carry into the next minibatch."""
    opt_init, opt_update = sgd_with_clipping(lr, theta)

    @jax.jit
    def step(params, opt_state, X, Y, state, key):
        train = model.dropout > 0.0

        def f(p):
            return model.loss(p, X, Y, state, key=key if train else None, train=train)

        (loss, new_state), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = opt_update(grads, opt_state, params)
        return _apply_updates(params, updates), opt_state, loss, R.detach_state(new_state)

    return opt_init, step


# ----------------------------------------------------------------------------- training


def perplexity(mean_nll: float) -> float:
    """``exp`` of the mean negative log-likelihood per token."""
    return float(math.exp(mean_nll))


def train_rnn_lm(
    model: RNNLM,
    params: dict,
    loader: Iterable[tuple[np.ndarray, np.ndarray]],
    num_epochs: int,
    *,
    lr: float = 1.0,
    theta: float = 1.0,
    use_random_iter: bool | None = None,
    key=None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[dict, dict[str, Any]]:
    """The book's ``train_ch8``: per epoch, one pass over ``loader``; the state is carried (and
    detached) across minibatches for sequential partitioning, re-initialised every minibatch for
    random sampling (``use_random_iter`` defaults to ``loader.use_random_iter``).

    Returns ``(params, history)`` with ``history["perplexity"]`` (per epoch), ``"tokens_per_s"``
    (steady-state, first epoch excluded), ``"wall_time"`` (s) and ``"compile_time"`` (s).
    """
    if use_random_iter is None:
        use_random_iter = bool(getattr(loader, "use_random_iter", False))
    key = jax.random.key(0) if key is None else key
    opt_init, step = make_train_step(model, lr, theta)
    opt_state = opt_init(params)
    hist: dict[str, Any] = {"perplexity": [], "epoch_time": []}
    t_start = time.perf_counter()
    compile_time = None
    n_step = 0
    for epoch in range(num_epochs):
        t0 = time.perf_counter()
        state = None
        n = 0
        losses = []
        for X, Y in loader:
            if state is None or use_random_iter:
                state = model.begin_state(X.shape[0])
            k = jax.random.fold_in(key, n_step)
            n_step += 1
            tc = time.perf_counter()
            params, opt_state, loss, state = step(params, opt_state, X, Y, state, k)
            if compile_time is None:
                jax.block_until_ready(loss)
                compile_time = time.perf_counter() - tc
            losses.append(loss)
            n += X.size
        if not losses:
            raise ValueError("train_rnn_lm: the loader yielded no minibatch")
        # every minibatch has the same number of tokens: the token mean is the batch mean
        hist["perplexity"].append(perplexity(float(np.mean(jax.device_get(losses)))))
        hist["epoch_time"].append(time.perf_counter() - t0)
        hist.setdefault("tokens_per_epoch", n)
        if log_every and ((epoch + 1) % log_every == 0 or epoch == 0):
            log(f"epoch {epoch + 1}: perplexity {hist['perplexity'][-1]:.3f}")
    hist["wall_time"] = time.perf_counter() - t_start
    hist["compile_time"] = compile_time
    steady = hist["epoch_time"][1:] or hist["epoch_time"]
    hist["tokens_per_s"] = hist["tokens_per_epoch"] * len(steady) / max(sum(steady), 1e-9)
    return params, hist


# ----------------------------------------------------------------------------- generation


def _predict_ids(model: RNNLM, params: dict, prefix_ids: jax.Array, num_preds: int):
    @jax.jit
    def run(params, prefix_ids):
        logits, state = model.apply(params, prefix_ids[None, :], None)
        first = jnp.argmax(logits[0, -1], axis=-1).astype(jnp.int32)

        def body(carry, _):
            tok, st = carry
            lg, st = model.apply(params, tok.reshape(1, 1), st)
            nxt = jnp.argmax(lg[0, -1], axis=-1).astype(jnp.int32)
            return (nxt, st), tok

        (_, _), toks = jax.lax.scan(body, (first, state), None, length=num_preds)
        return toks

    return run(params, prefix_ids)


def predict(model: RNNLM, params: dict, prefix: str, num_preds: int, vocab) -> str:
    """Greedy generation (the book's ``predict_ch8``): warm the state up on ``prefix`` (chars),
    then append ``num_preds`` argmax characters. Returns ``prefix`` + the generated text."""
    if not prefix:
        raise ValueError("predict: prefix must contain at least one token")
    if not isinstance(num_preds, int) or num_preds < 0:
        raise ValueError(f"predict: num_preds must be an integer >= 0, got {num_preds!r}")
    if num_preds == 0:
        return prefix
    ids = jnp.asarray(vocab[list(prefix)], jnp.int32)
    toks = np.asarray(_predict_ids(model, params, ids, num_preds))
    return prefix + "".join(vocab.to_tokens(toks.tolist()))
