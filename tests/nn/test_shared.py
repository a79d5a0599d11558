"""``nn.shared``: ties that work in every combinator, by sibling name or path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl import nn


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_tie_in_parallel_and_residual(key):
    net = nn.serial(
        ("fc", nn.dense(4)),
        ("both", nn.parallel(("a", nn.dense(4)), ("a_again", nn.shared("a")), combine="sum")),
        ("res", nn.residual(nn.shared("fc"))),  # a tie to a child of an enclosing combinator
    )
    out, params, _ = net.init(key, (2, 4))
    assert out == (2, 4) and set(params) == {"fc", "both"} and set(params["both"]) == {"a"}
    x = _x((2, 4))

    def dense(p, v):
        return v @ p["w"] + p["b"]

    def by_hand(p):
        h = dense(p["fc"], x)
        h = 2 * dense(p["both"]["a"], h)
        return dense(p["fc"], h) + h

    y, _ = jax.jit(net.apply)(params, {}, x)
    np.testing.assert_allclose(y, by_hand(params), rtol=1e-5)
    g = jax.grad(lambda p: jnp.sum(net.apply(p, {}, x)[0] ** 2))(params)
    g_ref = jax.grad(lambda p: jnp.sum(by_hand(p) ** 2))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_tied_decoder_by_path_like_bert(key):
    """An output projection tied to an embedding table two levels away."""
    net = nn.serial(
        ("embeddings", nn.serial(("token", nn.embedding(11, 6)))),
        ("body", nn.dense(6)),
        ("head", nn.serial(("decoder", nn.shared("embeddings/token", nn.attend_embedding())))),
    )
    out, params, _ = net.init(key, (2, 3))
    assert out == (2, 3, 11)
    assert "head" not in params  # the tie owns nothing
    tok = jnp.array([[1, 2, 3], [4, 5, 10]])
    y, _ = net.apply(params, {}, tok)
    table = params["embeddings"]["token"]["table"]
    h = table[tok] @ params["body"]["w"] + params["body"]["b"]
    np.testing.assert_allclose(y, h @ table.T, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda p: jnp.sum(net.apply(p, {}, tok)[0]))(params)
    # the table gets gradient from both uses: lookup rows and the projection
    g_lookup = jax.grad(lambda t: jnp.sum((t[tok] @ params["body"]["w"]) @ table.T))(table)
    g_proj = jax.grad(lambda t: jnp.sum(h @ t.T))(table)
    np.testing.assert_allclose(g["embeddings"]["token"]["table"], g_lookup + g_proj, rtol=1e-4,
                               atol=1e-5)
    text = nn.summary(net, (2, 3), print_fn=lambda s: None)
    assert f"total params: {11 * 6 + 6 * 6 + 6:,}" in text


def test_tie_errors(key):
    with pytest.raises(ValueError, match="no child 'nope'"):
        nn.serial(("e", nn.serial(("t", nn.embedding(3, 2)))),
                  ("d", nn.shared("e/nope"))).init(key, (1, 2))
    with pytest.raises(ValueError, match="initialised after the tie"):
        nn.parallel(("tie", nn.shared("a")), ("a", nn.dense(2))).init(key, (1, 2))
    with pytest.raises(ValueError, match="has state"):
        nn.parallel(("bn", nn.batch_norm()), ("tie", nn.shared("bn"))).init(key, (4, 2))
    with pytest.raises(ValueError, match="target"):
        nn.shared("a//b")
