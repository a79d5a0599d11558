"""fdl recurrent layers equal torch.nn.RNN/GRU/LSTM (weights converted by fdl.interop)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdl.nn as nn
from fdl.interop.torch_rnn import rnn_params_from_torch, rnn_params_to_torch

torch = pytest.importorskip("torch")

TORCH = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}
MAKE = {"rnn": nn.rnn, "gru": nn.gru, "lstm": nn.lstm}


def _torch_and_fdl(kind, n_in, hidden, num_layers, bidirectional, seed=0):
    torch.manual_seed(seed)
    m = getattr(torch.nn, TORCH[kind])(n_in, hidden, num_layers=num_layers,
                                       bidirectional=bidirectional, batch_first=True)
    layer = MAKE[kind](hidden, num_layers=num_layers, bidirectional=bidirectional)
    params = jax.tree_util.tree_map(jnp.asarray, rnn_params_from_torch(m.state_dict()))
    return m, layer, params


def _leaves(s):
    return s if isinstance(s, tuple) else (s,)


def _layer_state(kind, h0):
    """torch's (L*D, B, H) initial state(s) -> fdl's batch-first layer state."""
    parts = [jnp.swapaxes(jnp.asarray(a.detach().numpy()), 0, 1) for a in _leaves(h0)]
    return dict(zip(("h", "c"), parts, strict=False))


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True), (3, False)])
def test_equals_torch(kind, num_layers, bidirectional):
    B, T, F, H = 3, 7, 5, 6
    m, layer, params = _torch_and_fdl(kind, F, H, num_layers, bidirectional)
    d = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, F, generator=g)
    h0 = torch.randn(num_layers * d, B, H, generator=g)
    h0 = (h0, torch.randn(num_layers * d, B, H, generator=g)) if kind == "lstm" else h0
    with torch.no_grad():
        y_t, hn_t = m(x, h0)
    assert params["l0"]["fwd"]["w_ih"].dtype == jnp.float32
    if bidirectional:  # carry="reset": apply starts from zeros; a given h0 via the helper
        s0 = tuple(jnp.asarray(a.numpy()) for a in _leaves(h0))
        y, hn = jax.jit(layer.apply_with_state)(params, jnp.asarray(x.numpy()),
                                                s0 if kind == "lstm" else s0[0])
    else:  # the layer protocol: the initial carry is the layer state, the final one returned
        y, st = jax.jit(layer.apply)(params, _layer_state(kind, h0), jnp.asarray(x.numpy()))
        hn = tuple(jnp.swapaxes(st[k], 0, 1) for k in ("h", "c")[: len(st)])
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), y_t.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(_leaves(hn), _leaves(hn_t), strict=True):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-5, atol=1e-5)
    # zero initial state: apply from the state init returns; final carry = torch's h_n
    with torch.no_grad():
        y0_t, hn0_t = m(x)
    _, _, state0 = layer.init(jax.random.key(0), (B, T, F))
    y0, st0 = layer.apply(params, state0, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(y0), y0_t.numpy(), rtol=1e-5, atol=1e-5)
    for name, b in zip(("h", "c"), _leaves(hn0_t), strict=False):
        np.testing.assert_allclose(np.asarray(jnp.swapaxes(st0[name], 0, 1)), b.numpy(),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_seq_lengths_equal_packed_sequences(kind):
    """seq_lengths == torch's packed sequences (reverse direction within the valid length)."""
    B, T, F, H = 4, 6, 3, 5
    m, layer, params = _torch_and_fdl(kind, F, H, 2, True, seed=3)
    lens = [6, 2, 4, 1]
    x = torch.randn(B, T, F, generator=torch.Generator().manual_seed(2))
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lens, batch_first=True,
                                                     enforce_sorted=False)
    with torch.no_grad():
        out_p, hn_t = m(packed)
    y_t, _ = torch.nn.utils.rnn.pad_packed_sequence(out_p, batch_first=True, total_length=T)
    _, _, state0 = layer.init(jax.random.key(0), (B, T, F))
    y, st = layer.apply(params, state0, jnp.asarray(x.numpy()), seq_lengths=jnp.asarray(lens))
    np.testing.assert_allclose(np.asarray(y), y_t.numpy(), rtol=1e-5, atol=1e-5)
    for name, b in zip(("h", "c"), _leaves(hn_t), strict=False):
        np.testing.assert_allclose(np.asarray(jnp.swapaxes(st[name], 0, 1)), b.numpy(),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_round_trip_to_torch(kind, key):
    layer = MAKE[kind](4, num_layers=2, bidirectional=True)
    _, params, _ = layer.init(key, (1, 1, 3))
    sd = rnn_params_to_torch(params)
    m = getattr(torch.nn, TORCH[kind])(3, 4, num_layers=2, bidirectional=True)
    assert set(sd) == set(m.state_dict())
    m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    back = rnn_params_from_torch(m.state_dict())
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(jnp.asarray, back))


def test_converter_bad_inputs_and_no_bias():
    with pytest.raises(ValueError, match="unexpected key"):
        rnn_params_from_torch({"weight_xx_l0": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="empty"):
        rnn_params_from_torch({})
    m = torch.nn.GRU(3, 4, bias=False)
    p = rnn_params_from_torch({f"gru.{k}": v for k, v in m.state_dict().items()})
    assert np.all(p["l0"]["fwd"]["b_hh"] == 0) and p["l0"]["fwd"]["w_hh"].shape == (4, 12)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("backend", ["native", "xla"])
def test_backends_equal_torch_values_and_gradients(kind, backend):
    """Both rnn_backends (the native loop, the XLA loop) give torch's outputs, final states and
    gradients (weights, biases, input, initial state), float32, 2-layer bidirectional,
    non-zero initial state."""
    from fdl import config
    from fdl._ext import loader

    if backend == "native" and not loader.load("rnn").loaded:
        pytest.skip(f"native RNN library unavailable: {loader.status('rnn').reason}")
    with config.override(rnn_backend=backend):
        _check_backend_equals_torch(kind, backend)


def _check_backend_equals_torch(kind, backend):
    B, T, F, H = 3, 6, 4, 5
    m, layer, params = _torch_and_fdl(kind, F, H, 2, True, seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, T, F, generator=g, requires_grad=True)
    h0 = [torch.randn(4, B, H, generator=g, requires_grad=True)
          for _ in range(2 if kind == "lstm" else 1)]
    y_t, hn_t = m(x, tuple(h0) if kind == "lstm" else h0[0])
    loss_t = torch.sin(y_t).sum() + sum(torch.cos(a).sum() for a in _leaves(hn_t))
    loss_t.backward()
    grads_t = rnn_params_from_torch({k: p.grad for k, p in m.named_parameters()})

    s0 = tuple(jnp.asarray(a.detach().numpy()) for a in h0)
    s0 = s0 if kind == "lstm" else s0[0]

    def loss(p, x, s0):
        y, s = layer.apply_with_state(p, x, s0)
        return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(a)) for a in jax.tree_util.tree_leaves(s))

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    text = f.lower(params, jnp.asarray(x.detach().numpy()), s0).as_text()
    assert (f"fdl_{kind}_fwd" in text) == (backend == "native")
    v, (gp, gx, gs) = f(params, jnp.asarray(x.detach().numpy()), s0)
    np.testing.assert_allclose(float(v), loss_t.item(), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(grads_t),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), x.grad.numpy(), rtol=1e-4, atol=1e-5)
    for a, b in zip(_leaves(gs), h0, strict=True):
        np.testing.assert_allclose(np.asarray(a), b.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_relu_rnn_equals_torch(num_layers, bidirectional):
    """nn.rnn(nonlinearity="relu") == torch.nn.RNN(nonlinearity="relu"): outputs, final state
    and gradients (fused custom VJP and the scan path)."""
    B, T, F, H = 3, 6, 4, 5
    torch.manual_seed(7)
    m = torch.nn.RNN(F, H, num_layers=num_layers, bidirectional=bidirectional,
                     nonlinearity="relu", batch_first=True)
    params = jax.tree_util.tree_map(jnp.asarray, rnn_params_from_torch(m.state_dict()))
    x = torch.randn(B, T, F, generator=torch.Generator().manual_seed(8), requires_grad=True)
    y_t, hn_t = m(x)
    (torch.sin(y_t).sum() + torch.cos(hn_t).sum()).backward()
    grads_t = rnn_params_from_torch({k: p.grad for k, p in m.named_parameters()})
    for impl in ("fused", "scan"):
        layer = nn.rnn(H, num_layers=num_layers, bidirectional=bidirectional,
                       nonlinearity="relu", impl=impl)
        _, _, state0 = layer.init(jax.random.key(0), (B, T, F))

        def loss(p, x, layer=layer, state0=state0):
            y, st = layer.apply(p, state0, x)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(st["h"])), (y, st)

        (_, (y, st)), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            params, jnp.asarray(x.detach().numpy()))
        np.testing.assert_allclose(np.asarray(y), y_t.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(jnp.swapaxes(st["h"], 0, 1)),
                                   hn_t.detach().numpy(), rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(grads_t),
                        strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(gx), x.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_lstm_proj_size_equals_torch(num_layers, bidirectional):
    """nn.lstm(proj_size=P) == torch.nn.LSTM(proj_size=P) with imported weights (weight_hr):
    outputs, final (h, c) from a non-zero initial state, and gradients; export round-trips."""
    B, T, F, H, P = 3, 5, 4, 6, 3
    d = 2 if bidirectional else 1
    torch.manual_seed(9)
    m = torch.nn.LSTM(F, H, num_layers=num_layers, bidirectional=bidirectional, proj_size=P,
                      batch_first=True)
    params = jax.tree_util.tree_map(jnp.asarray, rnn_params_from_torch(m.state_dict()))
    assert params["l0"]["fwd"]["w_hr"].shape == (H, P)
    assert set(rnn_params_to_torch(params)) == set(m.state_dict())
    g = torch.Generator().manual_seed(10)
    x = torch.randn(B, T, F, generator=g, requires_grad=True)
    h0 = (torch.randn(num_layers * d, B, P, generator=g),
          torch.randn(num_layers * d, B, H, generator=g))
    y_t, (h_t, c_t) = m(x, h0)
    (torch.sin(y_t).sum() + torch.cos(h_t).sum() + torch.cos(c_t).sum()).backward()
    grads_t = rnn_params_from_torch({k: p.grad for k, p in m.named_parameters()})
    layer = nn.lstm(H, num_layers=num_layers, bidirectional=bidirectional, proj_size=P)

    def loss(p, x):
        y, (h, c) = layer.apply_with_state(p, x, tuple(jnp.asarray(a.numpy()) for a in h0))
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(h)) + jnp.sum(jnp.cos(c)), (y, h, c)

    (_, (y, h, c)), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, jnp.asarray(x.detach().numpy()))
    assert y.shape == (B, T, d * P)
    for a, b in ((y, y_t), (h, h_t), (c, c_t)):
        np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(grads_t),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), x.grad.numpy(), rtol=1e-4, atol=1e-5)
    if not bidirectional:  # through the layer protocol: state in, final state out
        y2, st = layer.apply(params, _layer_state("lstm", h0), jnp.asarray(x.detach().numpy()))
        np.testing.assert_allclose(np.asarray(y2), y_t.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(jnp.swapaxes(st["c"], 0, 1)),
                                   c_t.detach().numpy(), rtol=1e-5, atol=1e-5)
