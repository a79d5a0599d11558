"""The transformer and BERT training steps lower for GPU and TPU (``jax.export``; no
accelerator needed), with the decoder's cached step too."""

import jax
import jax.numpy as jnp
import pytest

from fdl import optim
from fdl.models.sequence.bert import BertConfig, bert_pretraining, pretraining_loss
from fdl.models.sequence.transformer import init_decoding, transformer_decoder


def _export(fn, *args):
    exp = jax.export.export(jax.jit(fn), platforms=("cuda", "tpu"))(*args)
    assert set(exp.platforms) == {"cuda", "tpu"}
    return exp


@pytest.mark.slow  # ~10 s quiet (init + tracing); the decoder step below runs by default
def test_bert_training_step_lowers_for_gpu_and_tpu():
    cfg = BertConfig(vocab_size=50, num_hiddens=16, ffn_hiddens=32, num_heads=2, num_layers=1,
                     max_len=16)
    model = bert_pretraining(cfg)
    b, t, p = 2, 8, 3
    _, params, _ = model.init(jax.random.key(0), ((b, t), (b, t), (b,), (b, p)))
    opt = optim.adam(1e-3)
    x = (jnp.ones((b, t), jnp.int32), jnp.zeros((b, t), jnp.int32), jnp.full((b,), t),
         jnp.ones((b, p), jnp.int32))
    y = (jnp.ones((b, p), jnp.int32), jnp.ones((b, p)), jnp.zeros((b,), jnp.int32))

    def step(params, opt_state, x, y, seed):
        def loss(pp):
            out, _ = model.apply(pp, {}, x, key=jax.random.key(seed), train=True)
            return pretraining_loss(out, *y)[0]

        value, g = jax.value_and_grad(loss)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optim.apply_updates(params, upd), opt_state, value

    _export(step, params, opt.init(params), x, y, jnp.uint32(0))


@pytest.mark.parametrize("cross", [False])
def test_cached_decoder_step_lowers(cross):
    dec = transformer_decoder(20, 16, 32, 2, 2, cross_attention=cross, max_len=8)
    _, p, _ = dec.init(jax.random.key(0), (2, 4))
    st = init_decoding(dec, p, 2, 8)
    _export(lambda p, s, t: dec.apply(p, s, t), p, st, jnp.ones((2, 1), jnp.int32))
