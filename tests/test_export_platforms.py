"""Every model family's training step lowers for CPU, CUDA and TPU (``jax.export``), and fdl's
native CPU kernels appear only in the CPU lowering (GPU/TPU get XLA's kernels).

A new family registers here: add a builder to ``FAMILIES`` returning ``(model, x, y)`` (float32
inputs, the batch the model's loss takes) or, for a model whose batch or loss needs more
(seq2seq: ``(src, src_valid_len, dec_in)`` with ``sequence_loss``), to ``STEPS`` returning
``(step, args)``; the check is
:func:`fdl.testing.check_lowers_on_all_platforms`.
Lowering (no compile) costs 1-5 s per family: families beyond one per kind are marked slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl import nn, optim
from fdl.testing import check_lowers_on_all_platforms, native_targets
from fdl.train import make_train_step


def _images(n, hw, c, classes=10):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32),
            jnp.asarray(rng.integers(0, classes, n), jnp.int32))


def _tokens(n, t, vocab):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.integers(0, vocab, (n, t)), jnp.int32),
            jnp.asarray(rng.integers(0, vocab, (n, t)), jnp.int32))


def _vision(name, hw, c, **kw):
    def build():
        from fdl.models import vision

        return (getattr(vision, name)(num_classes=10, in_channels=c, **kw), *_images(2, hw, c))

    return build


def _lm(kind):
    def build():
        vocab = 11
        model = nn.serial(("embed", nn.embedding(vocab, 8)),
                          ("rnn", getattr(nn, kind)(16, num_layers=2)), ("out", nn.dense(vocab)))
        return (model, *_tokens(2, 5, vocab))

    build.native = kind != "rnn"  # the tanh RNN has no native kernel
    return build


slow = pytest.mark.slow
FAMILIES = {
    "lenet5": _vision("lenet5", 28, 1),
    "resnet18": pytest.param(_vision("resnet18", 32, 3, small_input=True), marks=slow),
    "alexnet": pytest.param(_vision("alexnet", 224, 1), marks=slow),
    "vgg11": pytest.param(_vision("vgg11", 32, 3), marks=slow),
    "nin": pytest.param(_vision("nin", 224, 1), marks=slow),
    "googlenet": pytest.param(_vision("googlenet", 96, 1), marks=slow),
    "densenet": pytest.param(_vision("densenet_book", 32, 1, small_input=True), marks=slow),
    "mobilenet_v2": pytest.param(_vision("mobilenet_v2", 32, 3, small_input=True), marks=slow),
    "lstm_lm": _lm("lstm"),
    "gru_lm": _lm("gru"),
    "rnn_lm": pytest.param(_lm("rnn"), marks=slow),
}


def _seq2seq():
    from fdl.models.sequence import seq2seq as s2s

    model = s2s.seq2seq(9, 10, embed_size=8, num_hiddens=16)
    x, y = _tokens(2, 6, 9)
    dec_in = s2s.teacher_forcing_inputs(y, 1)
    batch = ((x, jnp.array([6, 4], jnp.int32), dec_in), (y, jnp.array([5, 6], jnp.int32)))
    _, params, state = model.init(jax.random.key(0), ((2, 6), (2,), (2, 6)))
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)  # the suite runs with x64
    opt = optim.sgd(0.1)
    step = make_train_step(model, opt, s2s.sequence_loss, jit=False)
    return step, (params, state, opt.init(params), batch, jax.random.key(1))


STEPS = {"seq2seq": _seq2seq}


def _check(step, args, native=True):
    texts = check_lowers_on_all_platforms(step, *args)
    from fdl._ext import loader

    if native and loader.load("conv").loaded and loader.load("rnn").loaded:
        assert any(t in texts["all"] for t in native_targets())  # the CPU branch is native
    return texts


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
def test_training_step_lowers_everywhere(family):
    model, x, y = family()
    _, params, state = model.init(jax.random.key(0), x.shape)
    params = jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(
        a.dtype, jnp.floating) else a, params)
    opt = optim.sgd(0.1, momentum=0.9)
    step = make_train_step(model, opt, jit=False)
    _check(step, (params, state, opt.init(params), (x, y), jax.random.key(1)),
           native=getattr(family, "native", True))


@pytest.mark.parametrize("name", STEPS)
def test_own_training_step_lowers_everywhere(name):
    _check(*STEPS[name]())
