"""BERT-small pretraining step (MLM + NSP), d2l's BERT at ANCHORS.md's size.

vocab 10k, d 256, 4 heads, FFN 512 (ReLU), 2 post-LN encoder layers, sequence 64 (full length,
no padding), batch 32, 10 masked positions per sequence with the MLM head on the gathered
positions only, dropout 0, Adam lr 1e-3. Every implementation does the same arithmetic: learned
positions, attention biases, LayerNorm eps 1e-5, no embedding LayerNorm, an untied MLM decoder
with bias (the PyTorch reference's ``nn.Linear(d, vocab)``), NSP on a tanh pooler.
"""

from __future__ import annotations

from functools import partial

from scripts.bench import common
from scripts.bench.api import Workload


def fdl_bert_step(scan_layers: bool = False):
    """fdl's step: ``bert_pretraining`` + ``pretraining_loss`` (d2l's weighted MLM mean + NSP
    mean; all weights 1 here, so the MLM term is the plain mean as in the references), Adam."""
    import jax
    import jax.numpy as jnp

    from fdl import optim
    from fdl.models.sequence.bert import BertConfig, bert_pretraining, pretraining_loss

    h = common.BERT
    data = common.bert_batch(**{k: h[k] for k in ("batch", "seq", "vocab", "masked")})
    tokens, segments, positions, mlm_y, nsp_y = (jnp.asarray(a) for a in data)
    valid = None  # full-length sequences, no padding mask (as the references)
    weights = jnp.ones(mlm_y.shape, jnp.float32)
    cfg = BertConfig.d2l(h["vocab"], num_hiddens=h["d"], ffn_hiddens=h["ffn"],
                         num_heads=h["heads"], num_layers=h["layers"], max_len=h["seq"],
                         dropout=0.0, use_bias=True, tie_mlm_decoder=False, init_std=0.02,
                         scan_layers=scan_layers)
    model = bert_pretraining(cfg)
    _, params, _ = model.init(jax.random.key(0), (tokens.shape, segments.shape, None,
                                                  positions.shape))
    opt = optim.adam(h["lr"])
    x = (tokens, segments, valid, positions)

    @partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, x, mlm_y, weights, nsp_y):
        def loss_fn(p):
            out, _ = model.apply(p, {}, x, train=True)
            return pretraining_loss(out, mlm_y, weights, nsp_y)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        params, opt_state = optim.apply_gradients(opt, grads, opt_state, params)
        return params, opt_state, loss

    carry = [params, opt.init(params)]

    def step():
        p, o, loss = train_step(*carry, x, mlm_y, weights, nsp_y)
        carry[:] = [p, o]
        return loss.block_until_ready()

    return step


def _torch(compile_model: bool):
    def build():
        from scripts.bench.references import torch_models

        return torch_models.bert_step(compile_model)

    return build


WORKLOADS = [
    Workload(
        name="bert_small",
        description=(
            "BERT-small MLM+NSP pretraining step: vocab 10k, d 256, 4 heads, FFN 512 (ReLU), 2 "
            "post-LN encoder layers, learned positions, sequence 64 (full length), batch 32, 10 "
            "masked positions per sequence (MLM head on the gathered positions), dropout 0, Adam "
            "lr 1e-3. PyTorch: `nn.TransformerEncoder`."
        ),
        impls={"fdl": fdl_bert_step, "fdl (xla)": common.xla_kernels(fdl_bert_step),
               "PyTorch eager": _torch(False),
               "torch.compile": _torch(True)},
        flops=common.bert_flops(**common.BERT),
        flops_note="analytic matmul count, forward x 3",
        quick_steps=20,
        steps=30,
    )
]
