"""Equinox references (idiomatic: per-example modules in Equinox's channels-first layout,
batched with ``jax.vmap(..., axis_name="batch")``, BatchNorm state through ``eqx.nn.State`` /
``eqx.nn.make_with_state``, ``eqx.filter_jit`` + ``eqx.filter_value_and_grad``, optax)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from scripts.bench import common


def _bn(c: int) -> eqx.nn.BatchNorm:
    return eqx.nn.BatchNorm(c, axis_name="batch", momentum=0.9, eps=1e-5, mode="batch")


class LeNetBN(eqx.Module):
    convs: list
    denses: list
    bns: list
    pool: eqx.nn.AvgPool2d

    def __init__(self, key):
        k = jax.random.split(key, 5)
        self.convs = [eqx.nn.Conv2d(1, 6, 5, key=k[0]), eqx.nn.Conv2d(6, 16, 5, key=k[1])]
        self.denses = [eqx.nn.Linear(256, 120, key=k[2]), eqx.nn.Linear(120, 84, key=k[3]),
                       eqx.nn.Linear(84, 10, key=k[4])]
        self.bns = [_bn(6), _bn(16), _bn(120), _bn(84)]
        self.pool = eqx.nn.AvgPool2d(2, 2)

    def __call__(self, x, state):  # x: (1, 28, 28)
        for conv, bn in zip(self.convs, self.bns[:2], strict=True):
            x, state = bn(conv(x), state)
            x = self.pool(jax.nn.sigmoid(x))
        x = x.reshape(-1)
        for lin, bn in zip(self.denses[:2], self.bns[2:], strict=True):
            x, state = bn(lin(x), state)
            x = jax.nn.sigmoid(x)
        return self.denses[2](x), state


class BasicBlock(eqx.Module):
    conv1: eqx.nn.Conv2d
    bn1: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    bn2: eqx.nn.BatchNorm
    down: eqx.nn.Conv2d | None
    down_bn: eqx.nn.BatchNorm | None

    def __init__(self, cin, cout, stride, key):
        k = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(cin, cout, 3, stride, 1, use_bias=False, key=k[0])
        self.bn1 = _bn(cout)
        self.conv2 = eqx.nn.Conv2d(cout, cout, 3, 1, 1, use_bias=False, key=k[1])
        self.bn2 = _bn(cout)
        if stride != 1 or cin != cout:
            self.down = eqx.nn.Conv2d(cin, cout, 1, stride, use_bias=False, key=k[2])
            self.down_bn = _bn(cout)
        else:
            self.down, self.down_bn = None, None

    def __call__(self, x, state):
        y, state = self.bn1(self.conv1(x), state)
        y, state = self.bn2(self.conv2(jax.nn.relu(y)), state)
        if self.down is not None:
            x, state = self.down_bn(self.down(x), state)
        return jax.nn.relu(y + x), state


class ResNet18(eqx.Module):
    stem: eqx.nn.Conv2d
    stem_bn: eqx.nn.BatchNorm
    blocks: list
    fc: eqx.nn.Linear

    def __init__(self, num_classes, key):
        k = jax.random.split(key, 10)
        self.stem = eqx.nn.Conv2d(3, 64, 3, 1, 1, use_bias=False, key=k[0])
        self.stem_bn = _bn(64)
        blocks, cin, i = [], 64, 1
        for s, f in enumerate((64, 128, 256, 512)):
            for b in range(2):
                blocks.append(BasicBlock(cin, f, 2 if (s > 0 and b == 0) else 1, k[i]))
                cin, i = f, i + 1
        self.blocks = blocks
        self.fc = eqx.nn.Linear(512, num_classes, key=k[9])

    def __call__(self, x, state):  # x: (3, 32, 32)
        x, state = self.stem_bn(self.stem(x), state)
        x = jax.nn.relu(x)
        for blk in self.blocks:
            x, state = blk(x, state)
        return self.fc(jnp.mean(x, axis=(1, 2))), state


def _classifier(model, state, x, y, tx):
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit(donate="all-except-first")
    def train_step(batch, model, state, opt_state):
        x, y = batch
        def loss_fn(model, state):
            batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
            logits, state = batched(x, state)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, opt_state, loss

    carry = [model, state, opt_state]

    def step():
        m, s, o, loss = train_step((x, y), *carry)
        carry[:] = [m, s, o]
        return loss.block_until_ready()

    return step


def lenet_step():
    h = common.LENET
    x, y = common.image_batch(h["batch"], 28, 1, 10)
    model, state = eqx.nn.make_with_state(LeNetBN)(jax.random.key(0))
    tx = optax.sgd(h["lr"], momentum=h["momentum"])
    return _classifier(model, state, jnp.asarray(common.nchw(x)), jnp.asarray(y), tx)


def resnet18_step():
    h = common.RESNET
    x, y = common.image_batch(h["batch"], 32, 3, h["classes"])
    model, state = eqx.nn.make_with_state(ResNet18)(h["classes"], jax.random.key(0))
    tx = optax.sgd(h["lr"], momentum=h["momentum"])
    return _classifier(model, state, jnp.asarray(common.nchw(x)), jnp.asarray(y), tx)


class CharLM(eqx.Module):
    cell: eqx.Module
    out: eqx.nn.Linear
    hidden: int = eqx.field(static=True)
    kind: str = eqx.field(static=True)

    def __init__(self, kind, vocab, hidden, key):
        k1, k2 = jax.random.split(key)
        cls = eqx.nn.LSTMCell if kind == "lstm" else eqx.nn.GRUCell
        self.cell = cls(vocab, hidden, key=k1)
        self.out = eqx.nn.Linear(hidden, vocab, key=k2)
        self.hidden, self.kind = hidden, kind

    def __call__(self, onehot):  # (T, B, V) -> (T, B, V)
        b = onehot.shape[1]
        h0 = jnp.zeros((b, self.hidden), onehot.dtype)
        carry0 = (h0, h0) if self.kind == "lstm" else h0
        cell = jax.vmap(self.cell)

        def body(carry, x):
            carry = cell(x, carry)
            h = carry[0] if self.kind == "lstm" else carry
            return carry, h

        _, hs = jax.lax.scan(body, carry0, onehot)
        return jax.vmap(jax.vmap(self.out))(hs)


def charlm_step(kind: str):
    h = common.CHARLM
    tokens, targets = common.char_batch(h["batch"], h["steps"], h["vocab"])
    tokens, targets = jnp.asarray(tokens.T), jnp.asarray(targets.T)  # time-major
    model = CharLM(kind, h["vocab"], h["hidden"], jax.random.key(0))
    tx = optax.chain(optax.clip_by_global_norm(h["clip"]), optax.sgd(h["lr"]))
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit(donate="all-except-first")
    def train_step(batch, model, opt_state):
        tokens, targets = batch
        def loss_fn(model):
            logits = model(jax.nn.one_hot(tokens, h["vocab"]))
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    carry = [model, opt_state]

    def step():
        m, o, loss = train_step((tokens, targets), *carry)
        carry[:] = [m, o]
        return loss.block_until_ready()

    return step
