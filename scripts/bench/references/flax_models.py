"""Flax linen references (idiomatic: ``nn.compact`` modules, BatchNorm through the
``batch_stats`` collection with ``mutable=["batch_stats"]``, optax optimizers, one ``jax.jit``
train step with donated buffers). Layout NHWC."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from scripts.bench import common


class LeNetBN(nn.Module):
    """d2l's LeNet-5 with BatchNorm: conv(6,5)-BN-sigmoid-avgpool2 ... dense(10)."""

    decay: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool):
        bn = partial(nn.BatchNorm, use_running_average=not train, momentum=self.decay,
                     epsilon=1e-5)
        x = nn.Conv(6, (5, 5), padding="VALID")(x)
        x = nn.avg_pool(nn.sigmoid(bn()(x)), (2, 2), (2, 2))
        x = nn.Conv(16, (5, 5), padding="VALID")(x)
        x = nn.avg_pool(nn.sigmoid(bn()(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.sigmoid(bn()(nn.Dense(120)(x)))
        x = nn.sigmoid(bn()(nn.Dense(84)(x)))
        return nn.Dense(10)(x)


class BasicBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        bn = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        s = (self.strides, self.strides)
        y = nn.Conv(self.features, (3, 3), s, padding=1, use_bias=False)(x)
        y = nn.relu(bn()(y))
        y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y)
        y = bn()(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = bn()(nn.Conv(self.features, (1, 1), s, use_bias=False)(x))
        return nn.relu(y + x)


class ResNet18(nn.Module):
    """ResNet-18, BasicBlock [2,2,2,2]. CIFAR stem (default): conv3x3(64)-BN-ReLU, no max-pool;
    ``imagenet_stem``: torchvision's conv7x7/2(64)-BN-ReLU-maxpool3x3/2."""

    num_classes: int = 10
    imagenet_stem: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        if self.imagenet_stem:
            x = nn.Conv(64, (7, 7), (2, 2), padding=3, use_bias=False)(x)
        else:
            x = nn.Conv(64, (3, 3), padding=1, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
        if self.imagenet_stem:
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, f in enumerate((64, 128, 256, 512)):
            x = BasicBlock(f, 1 if i == 0 else 2)(x, train)
            x = BasicBlock(f)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def _classifier(model: nn.Module, x, y, tx):
    variables = model.init(jax.random.key(0), x, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    carry = [params, batch_stats, tx.init(params)]

    def step():
        p, b, o, loss = train_step(*carry, x, y)
        carry[:] = [p, b, o]
        return loss.block_until_ready()

    return step


def lenet_step():
    h = common.LENET
    x, y = common.image_batch(h["batch"], 28, 1, 10)
    tx = optax.sgd(h["lr"], momentum=h["momentum"])
    return _classifier(LeNetBN(), jnp.asarray(x), jnp.asarray(y), tx)


def resnet18_step():
    h = common.RESNET
    x, y = common.image_batch(h["batch"], 32, 3, h["classes"])
    tx = optax.sgd(h["lr"], momentum=h["momentum"])
    return _classifier(ResNet18(h["classes"]), jnp.asarray(x), jnp.asarray(y), tx)


def classifier_flops(which: str) -> float:
    """XLA's cost-analysis FLOP count of the Flax training step (no scan inside)."""
    lenet = which == "lenet"
    h = common.LENET if lenet else common.RESNET
    model = LeNetBN() if lenet else ResNet18(h["classes"])
    x, y = common.image_batch(h["batch"], 28 if lenet else 32, 1 if lenet else 3, 10)
    x, y = jnp.asarray(x), jnp.asarray(y)
    variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), x)
    tx = optax.sgd(h["lr"], momentum=h["momentum"])

    def train_step(params, batch_stats, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), upd, opt_state, loss

    return common.xla_flops(train_step, variables["params"], variables["batch_stats"], x, y)


class CharLM(nn.Module):
    """One-hot input -> scanned LSTM/GRU (``nn.RNN``) -> dense to the vocabulary."""

    kind: str
    hidden: int
    vocab: int

    @nn.compact
    def __call__(self, onehot):
        cell = (nn.OptimizedLSTMCell(self.hidden) if self.kind == "lstm"
                else nn.GRUCell(self.hidden))
        h = nn.RNN(cell)(onehot)  # (B, T, H), zero initial carry
        return nn.Dense(self.vocab)(h)


def charlm_step(kind: str):
    h = common.CHARLM
    tokens, targets = common.char_batch(h["batch"], h["steps"], h["vocab"])
    tokens, targets = jnp.asarray(tokens), jnp.asarray(targets)
    model = CharLM(kind, h["hidden"], h["vocab"])
    params = model.init(jax.random.key(0), jax.nn.one_hot(tokens, h["vocab"]))["params"]
    tx = optax.chain(optax.clip_by_global_norm(h["clip"]), optax.sgd(h["lr"]))

    @partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, tokens, targets):
        def loss_fn(p):
            logits = model.apply({"params": p}, jax.nn.one_hot(tokens, h["vocab"]))
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    carry = [params, tx.init(params)]

    def step():
        p, o, loss = train_step(*carry, tokens, targets)
        carry[:] = [p, o]
        return loss.block_until_ready()

    return step
