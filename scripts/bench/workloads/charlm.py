"""Character-LM training steps: one-layer LSTM and GRU, d2l's settings.

vocab 28 (one-hot input), hidden 256, 35 time steps, batch 32, zero initial state, dense
output to the vocabulary, mean softmax cross-entropy over all positions, gradients clipped to
global norm 1, SGD lr 1 (no momentum). The same for every implementation.
"""

from __future__ import annotations

from scripts.bench import common
from scripts.bench.api import Workload

_PENDING = None
try:
    from fdl import nn as fnn
    from fdl import optim as foptim
    from fdl.nn import recurrent as frec

    foptim.sgd, foptim.chain, foptim.clip_by_global_norm, foptim.apply_updates  # noqa: B018
    frec.lstm, frec.gru  # noqa: B018
except Exception as e:  # noqa: BLE001
    _PENDING = f"fdl capability missing: {type(e).__name__}: {e}"


def _fdl(kind: str):
    def build():
        from functools import partial

        import jax
        import jax.numpy as jnp

        h = common.CHARLM
        tokens, targets = common.char_batch(h["batch"], h["steps"], h["vocab"])
        tokens, targets = jnp.asarray(tokens), jnp.asarray(targets)
        rnn = frec.lstm(h["hidden"]) if kind == "lstm" else frec.gru(h["hidden"])
        net = fnn.serial(("rnn", rnn), ("out", fnn.dense(h["vocab"])))
        _, params, state = net.init(jax.random.key(0), (h["batch"], h["steps"], h["vocab"]))
        opt = foptim.chain(foptim.clip_by_global_norm(h["clip"]), foptim.sgd(h["lr"]))

        @partial(jax.jit, donate_argnums=(0, 1))
        def train_step(params, opt_state, tokens, targets):
            def loss_fn(p):
                logits, _ = net.apply(p, state, jax.nn.one_hot(tokens, h["vocab"]), train=True)
                return fnn.losses.softmax_cross_entropy(logits, targets)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return foptim.apply_updates(params, updates), opt_state, loss

        carry = [params, opt.init(params)]

        def step():
            p, o, loss = train_step(*carry, tokens, targets)
            carry[:] = [p, o]
            return loss.block_until_ready()

        return step

    return build


def _ref(lib: str, kind: str):
    def build():
        if lib == "flax":
            from scripts.bench.references import flax_models as m
        elif lib == "equinox":
            from scripts.bench.references import equinox_models as m
        else:
            from scripts.bench.references import torch_models as m
        return m.charlm_step(kind)

    return build


def _workload(kind: str) -> Workload:
    h = common.CHARLM
    impls = {} if _PENDING else {"fdl": _fdl(kind), "fdl (xla)": common.xla_kernels(_fdl(kind))}
    impls.update({
        "Flax linen (nn.RNN scan)": _ref("flax", kind),
        f"Equinox ({'LSTMCell' if kind == 'lstm' else 'GRUCell'} under lax.scan)":
            _ref("equinox", kind),
        f"PyTorch eager (fused nn.{kind.upper()})": _ref("torch", kind),
    })
    return Workload(
        name=f"charlm_{kind}",
        description=(
            f"Character LM, one-layer {kind.upper()}: one-hot input (vocab 28), hidden 256, 35 "
            "time steps, batch 32, float32, zero initial state, dense to the vocabulary, mean "
            "softmax cross-entropy over all positions, gradient clipping (global norm 1), SGD lr "
            "1. Flax: `nn.RNN` over `OptimizedLSTMCell`/`GRUCell` (batch-major); Equinox: the "
            "cell vmapped over the batch inside `lax.scan` (time-major); PyTorch: the fused "
            f"`nn.{kind.upper()}` (time-major). torch.compile is not run (no fused-kernel gain "
            "for RNNs; long compile)."
        ),
        impls=impls,
        flops=common.rnn_flops(kind, h["batch"], h["steps"], h["vocab"], h["hidden"]),
        flops_note="analytic matmul count, forward x 3 (XLA's cost analysis counts a scan "
                   "body once)",
        pending=_PENDING,
        quick_steps=20,
        steps=50,
    )


WORKLOADS = [_workload("lstm"), _workload("gru")]
