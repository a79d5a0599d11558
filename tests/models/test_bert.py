"""BERT: the tied MLM decoder, gathered positions, the d2l loss, fine-tuning heads, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl.models.sequence.bert import (
    BertConfig,
    bert_classifier,
    bert_encoder,
    bert_pretraining,
    bert_qa,
    bert_tagger,
    gather_positions,
    pretraining_loss,
)
from fdl.nn.core import ShapeError

CFG = BertConfig.d2l(40, num_hiddens=16, ffn_hiddens=32, num_heads=2, num_layers=2, max_len=12,
                     dropout=0.1)


def _batch(b=3, t=8, p=2, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 40, size=(b, t)), jnp.int32)
    segments = jnp.asarray((np.arange(t) >= t // 2).astype(np.int32)[None].repeat(b, 0))
    valid = jnp.asarray([t, t - 2, 3][:b], jnp.int32)
    positions = jnp.asarray(np.stack([rng.choice(np.arange(1, 3), p, replace=False)
                                      for _ in range(b)]), jnp.int32)
    return tokens, segments, valid, positions


@pytest.fixture(scope="module")
def model_params():
    model = bert_pretraining(CFG)
    shapes = ((3, 8), (3, 8), (3,), (3, 2))
    out_shape, params, state = model.init(jax.random.key(0), shapes)
    return model, params


def test_tied_decoder_and_gathered_positions(model_params):
    model, params = model_params
    assert "decoder" not in params["mlm"]  # tied: the token table is the decoder
    x = _batch()
    out, _ = jax.jit(model.apply)(params, {}, x)
    assert out.mlm_logits.shape == (3, 2, 40) and out.nsp_logits.shape == (3, 2)
    # MLM logits at gathered positions = the head on the full sequence, then gathered
    table = params["bert"]["embeddings"]["token"]["table"]
    m = params["mlm"]
    h = jax.nn.relu(out.encoded @ m["dense"]["w"] + m["dense"]["b"])
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / jnp.sqrt(var + 1e-5) * m["norm"]["scale"] + m["norm"]["offset"]
    full = h @ table.T + m["bias"]
    np.testing.assert_allclose(out.mlm_logits, gather_positions(full, x[3]), rtol=1e-4,
                               atol=1e-5)
    # the tied table gets gradient from the MLM decoder too
    mlm_y, w, nsp_y = jnp.zeros((3, 2), jnp.int32), jnp.ones((3, 2)), jnp.zeros((3,), jnp.int32)

    def loss(p):
        o, _ = model.apply(p, {}, x)
        return pretraining_loss(o, mlm_y, w, nsp_y)[0]

    g = jax.jit(jax.grad(loss))(params)["bert"]["embeddings"]["token"]["table"]
    unused = np.setdiff1d(np.arange(40), np.asarray(x[0]))
    assert np.abs(np.asarray(g)[unused]).max() > 0  # rows never looked up: decoder gradient


def test_pretraining_loss_is_d2l(model_params):
    model, params = model_params
    x = _batch()
    out, _ = model.apply(params, {}, x)
    mlm_y = jnp.array([[1, 2], [3, 4], [5, 0]])
    w = jnp.array([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    nsp_y = jnp.array([0, 1, 1])
    total, (mlm, nsp) = pretraining_loss(out, mlm_y, w, nsp_y)
    lp = np.asarray(jax.nn.log_softmax(out.mlm_logits))
    ce = -np.take_along_axis(lp, np.asarray(mlm_y)[..., None], -1)[..., 0]
    np.testing.assert_allclose(mlm, (ce * np.asarray(w)).sum() / np.asarray(w).sum(), rtol=1e-5)
    nlp = np.asarray(jax.nn.log_softmax(out.nsp_logits))
    np.testing.assert_allclose(nsp, -nlp[np.arange(3), np.asarray(nsp_y)].mean(), rtol=1e-5)
    np.testing.assert_allclose(total, mlm + nsp, rtol=1e-6)


def test_padding_does_not_leak(model_params):
    model, params = model_params
    tokens, seg, valid, pos = _batch()
    out1, _ = model.apply(params, {}, (tokens, seg, valid, pos))
    out2, _ = model.apply(params, {}, (tokens.at[2, 3:].set(7), seg, valid, pos))
    np.testing.assert_allclose(out1.encoded[2, :3], out2.encoded[2, :3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out1.nsp_logits, out2.nsp_logits, rtol=1e-5, atol=1e-6)


def test_finetuning_heads(key):
    tokens, seg, valid, _ = _batch()
    x = (tokens, seg, valid)
    shapes = ((3, 8), (3, 8), (3,))
    for layer, want in ((bert_classifier(CFG, 3), (3, 3)), (bert_tagger(CFG, 5), (3, 8, 5))):
        out_shape, p, _ = layer.init(key, shapes)
        y, _ = layer.apply(p, {}, x)
        assert y.shape == want == tuple(out_shape)
        assert set(p) == {"bert", "head"}
        y_tr, _ = layer.apply(p, {}, x, key=jax.random.key(1), train=True)
        assert y_tr.shape == want
    qa = bert_qa(CFG)
    out_shape, p, _ = qa.init(key, shapes)
    (start, end), _ = qa.apply(p, {}, x)
    assert start.shape == end.shape == (3, 8) == out_shape[0]
    # the pretrained encoder's params drop into a fine-tuning model unchanged
    _, pb, _ = bert_encoder(CFG).init(key, shapes)
    assert jax.tree_util.tree_structure(pb) == jax.tree_util.tree_structure(p["bert"])
    # dict shapes work as well as tuples
    _, pd, _ = bert_qa(CFG).init(key, {"tokens": (3, 8), "segments": (3, 8), "valid_lens": (3,)})
    assert jax.tree_util.tree_structure(pd) == jax.tree_util.tree_structure(p)


def test_bad_input(model_params):
    model, params = model_params
    tokens, seg, valid, pos = _batch()
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        model.apply(params, {}, (tokens.at[0, 0].set(40), seg, valid, pos))
    with pytest.raises(ValueError, match=r"segments.*\[0, 2\)"):
        model.apply(params, {}, (tokens, seg.at[0, 0].set(2), valid, pos))
    long = jnp.zeros((1, 13), jnp.int32)
    with pytest.raises(ValueError, match="max_len 12"):
        model.apply(params, {}, (long, long, jnp.array([13]), pos[:1]))
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(100, num_hiddens=30, num_heads=4)
    with pytest.raises(ValueError, match="activation"):
        BertConfig(100, activation="swish")


def test_dict_inputs_and_the_objective(model_params):
    """x as a dict equals x as a tuple; pretraining_objective is pretraining_loss with padding
    rows dropped."""
    from fdl.models.sequence.bert import pretraining_objective

    model, params = model_params
    tokens, seg, valid, pos = _batch()
    xd = {"tokens": tokens, "segments": seg, "valid_lens": valid, "pred_positions": pos}
    out_t, _ = model.apply(params, {}, (tokens, seg, valid, pos))
    out_d, _ = model.apply(params, {}, xd)
    np.testing.assert_array_equal(out_t.mlm_logits, out_d.mlm_logits)
    with pytest.raises(ShapeError, match="segments"):
        model.apply(params, {}, {"tokens": tokens})
    y = {"mlm_labels": jnp.array([[1, 2], [3, 4], [5, 0]]), "nsp_labels": jnp.array([0, 1, 1]),
         "mlm_weights": jnp.array([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])}
    obj = pretraining_objective().fn
    value, metrics = obj(out_d, y, None)
    ref, (mlm, nsp) = pretraining_loss(out_d, y["mlm_labels"], y["mlm_weights"],
                                       y["nsp_labels"])
    np.testing.assert_allclose(value, ref, rtol=1e-6)
    np.testing.assert_allclose(metrics["mlm"][0], mlm, rtol=1e-6)
    # a padding row (mask 0) counts in neither mean
    first2 = jax.tree_util.tree_map(lambda a: a[:2], out_d)
    _, (mlm2, nsp2) = pretraining_loss(first2, *(y[k][:2] for k in
                                                 ("mlm_labels", "mlm_weights", "nsp_labels")))
    _, m = obj(out_d, y, jnp.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose((m["mlm"][0], m["nsp"][0]), (mlm2, nsp2), rtol=1e-6)


# ~20 s (compiles a training step); fit on BERT is in the default run through
# tests/train/test_families.py
@pytest.mark.slow
def test_pretraining_objective_trains_with_fit(model_params):
    """fit on dict batches with pretraining_objective: MLM and NSP reported next to the loss."""
    from fdl import optim
    from fdl.models.sequence.bert import pretraining_objective
    from fdl.train import fit

    model, params = model_params
    rng = np.random.default_rng(0)
    n = 24
    xs = {"tokens": rng.integers(0, 40, (n, 8)).astype(np.int32),
          "segments": np.zeros((n, 8), np.int32), "valid_lens": np.full((n,), 8, np.int32),
          "pred_positions": np.tile(np.array([[1, 2]], np.int32), (n, 1))}
    ys = {"mlm_labels": xs["tokens"][:, 1:3], "mlm_weights": np.ones((n, 2), np.float32),
          "nsp_labels": (xs["tokens"][:, 0] % 2).astype(np.int32)}
    res = fit(model, params, {}, optim.adam(1e-2), (xs, ys), epochs=3, batch_size=8,
              key=jax.random.key(0), loss=pretraining_objective(), print_fn=None,
              progress=False)
    h = res.history
    assert h["train_mlm"][-1] < h["train_mlm"][0]
    assert h.last["train_loss"] == pytest.approx(h.last["train_mlm"] + h.last["train_nsp"],
                                                 rel=1e-4)


def test_compute_dtype_and_mixed_precision(model_params):
    """BertConfig's compute_dtype is checked (strings accepted); nn.mixed_precision wraps the
    pretraining model: float32 master params and outputs, close to float32."""
    import dataclasses

    from fdl import nn

    assert dataclasses.replace(CFG, compute_dtype="bfloat16").compute_dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="compute_dtype"):
        dataclasses.replace(CFG, compute_dtype="int8")
    model, params = model_params
    x = _batch()
    out32, _ = jax.jit(model.apply)(params, {}, x)
    out16, _ = jax.jit(nn.mixed_precision(model, "bfloat16").apply)(params, {}, x)
    assert out16.mlm_logits.dtype == out16.encoded.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(out16.mlm_logits - out32.mlm_logits)))
    assert 0 < err < 0.1
