"""One fit for every family: pytree batches (tuple/dict inputs and targets), weighted sequence
losses, an Objective with several losses, custom metrics, perplexity, state carried across
batches and reset per epoch, re-iterable batch sources (with bitwise resume)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl import nn, optim
from fdl.data import ArrayLoader
from fdl.train import Objective, Trainer, evaluate, fit, make_eval_step, make_train_step

from .helpers import blobs, init, leaves_equal, tiny_mlp

V, T, D = 7, 5, 8


def seq_model(params, state, x, *, key=None, train=False):
    """x = (tokens (N, T), lengths (N,)) -> logits (N, T, V); lengths unused by the model."""
    tokens, _ = x
    return jnp.tanh(params["emb"][tokens]) @ params["out"], state


def seq_params():
    k1, k2 = jax.random.split(jax.random.key(3))
    return {"emb": jax.random.normal(k1, (V, D)), "out": 0.3 * jax.random.normal(k2, (D, V))}


def seq_data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (n, T)).astype(np.int32)
    lengths = rng.integers(1, T + 1, n).astype(np.int32)
    targets = (tokens + 1) % V
    return (tokens, lengths), (targets, lengths)


def masked_ce(out, y):
    targets, lengths = y
    per = nn.softmax_cross_entropy(out, targets, reduction="none")  # (N, T)
    return per, (jnp.arange(T)[None, :] < lengths[:, None]).astype(per.dtype)


SEQ_STEP = make_train_step(seq_model, optim.adam(0.05), masked_ce, perplexity=True)
SEQ_EVAL = make_eval_step(seq_model, masked_ce, perplexity=True)


def _seq_fit(monkeypatch=None, **kw):
    base = dict(epochs=2, key=jax.random.key(0), batch_size=8, eval_data=seq_data(10, 1),
                train_step=SEQ_STEP, eval_step=SEQ_EVAL, progress=False, print_fn=None)
    return fit(seq_model, seq_params(), {}, optim.adam(0.05), seq_data(), **{**base, **kw})


def test_tuple_inputs_and_token_weights_on_both_paths(monkeypatch):
    fast = _seq_fit()
    with monkeypatch.context() as m:
        m.setattr(ArrayLoader, "indexable_on_device", property(lambda self: False))
        slow = _seq_fit()
    for a, b in zip(jax.tree.leaves(fast.params), jax.tree.leaves(slow.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    row = fast.history.last
    assert row["test_perplexity"] == pytest.approx(np.exp(row["test_loss"]))
    assert row["train_perplexity"] == pytest.approx(np.exp(row["train_loss"]))
    # the loss is the mean over valid tokens only
    (xt, yt) = seq_data(10, 1)
    logits, _ = seq_model(fast.params, {}, jax.tree.map(jnp.asarray, xt))
    per, w = masked_ce(logits, jax.tree.map(jnp.asarray, yt))
    want = float(jnp.sum(per * w) / jnp.sum(w))
    assert row["test_loss"] == pytest.approx(want, rel=1e-5)
    assert evaluate(fast.params, {}, (xt, yt), eval_step=SEQ_EVAL)["loss"] == pytest.approx(
        want, rel=1e-5)


def two_head(params, state, x, *, key=None, train=False):
    h = jnp.tanh(x["a"] @ params["w"] + x["b"][:, None] * params["v"])
    return (h @ params["cls"], h @ params["reg"]), state


def two_head_objective(out, y, mask):
    logits, pred = out
    w = jnp.ones(logits.shape[0]) if mask is None else mask
    ce = nn.softmax_cross_entropy(logits, y["cls"], reduction="none")
    se = jnp.sum((pred - y["reg"]) ** 2, axis=-1)
    n = jnp.sum(w)
    loss = jnp.sum(ce * w) / n + jnp.sum(se * w) / n
    return loss, {"ce": (jnp.sum(ce * w), n), "se": (jnp.sum(se * w), n),
                  "hits": jnp.sum((jnp.argmax(logits, -1) == y["cls"]) * w)}


def two_head_data(n, seed):
    x, y = blobs(n, seed=seed)
    reg = x[:, :2].astype(np.float32)
    return {"a": x, "b": x[:, 0]}, {"cls": y, "reg": reg}


def test_objective_with_several_losses_and_dict_batches():
    k = jax.random.split(jax.random.key(1), 4)
    params = {"w": 0.3 * jax.random.normal(k[0], (5, 8)), "v": jax.random.normal(k[1], (8,)),
              "cls": 0.3 * jax.random.normal(k[2], (8, 3)),
              "reg": 0.3 * jax.random.normal(k[3], (8, 2))}
    obj = Objective(two_head_objective)
    res = fit(two_head, params, {}, optim.adam(0.05), two_head_data(20, 1), epochs=3,
              key=jax.random.key(0), batch_size=8, eval_data=two_head_data(12, 2), loss=obj,
              progress=False, print_fn=None)
    row = res.history.last
    assert {"train_ce", "train_se", "train_hits", "test_ce", "test_se", "test_hits"} <= set(row)
    assert "train_acc" not in row and "test_perplexity" not in row
    assert row["test_loss"] == pytest.approx(row["test_ce"] + row["test_se"], rel=1e-5)
    assert res.history["train_ce"][-1] < res.history["train_ce"][0]
    ev = evaluate(res.params, {}, two_head_data(12, 2), model=two_head, loss=obj)
    assert ev["hits"] == pytest.approx(row["test_hits"]) and 0 <= ev["hits"] <= 1


def test_custom_metrics_next_to_a_named_loss():
    model = tiny_mlp()
    params, state = init(model)

    def errors(out, y, mask):
        wrong = (jnp.argmax(out, -1) != y).astype(jnp.float32)
        w = jnp.ones_like(wrong) if mask is None else mask
        return {"err": (jnp.sum(wrong * w), jnp.sum(w)), "margin": jnp.sum(jnp.max(out, -1) * w)}

    res = fit(model, params, state, optim.adam(0.05), blobs(20, seed=1), epochs=2,
              key=jax.random.key(0), batch_size=8, eval_data=blobs(12, seed=2),
              metrics=errors, progress=False, print_fn=None)
    row = res.history.last
    assert row["test_err"] == pytest.approx(1 - row["test_acc"])
    assert row["train_err"] == pytest.approx(1 - row["train_acc"])
    assert "test_margin" in row and "perplexity" not in str(sorted(row))
    with pytest.raises(ValueError, match="already used"):
        make_train_step(model, optim.sgd(0.1), metrics=lambda o, y, m: {"loss": 1.0})(
            params, state, optim.sgd(0.1).init(params), blobs(4), jax.random.key(0))


def test_sum_reduction_scales_the_gradient():
    model = tiny_mlp(bn=False)
    params, state = init(model)
    x, y = blobs(6)
    opt = optim.sgd(0.01)
    mean = make_train_step(model, opt, donate=False)
    total = make_train_step(model, opt, donate=False, loss_reduction="sum")
    pm, _, _, mm = mean(params, state, opt.init(params), (x, y), jax.random.key(0))
    ps, _, _, ms = total(params, state, opt.init(params), (x, y), jax.random.key(0))
    for p0, a, b in zip(*map(jax.tree.leaves, (params, pm, ps)), strict=True):
        np.testing.assert_allclose(b - p0, 6 * (a - p0), rtol=2e-4, atol=1e-7)
    assert float(mm["loss"]) == float(ms["loss"])  # the logged loss stays the mean's sums
    with pytest.raises(ValueError, match="loss_reduction"):
        make_train_step(model, opt, loss_reduction="none")


def counting_model(params, state, x, *, key=None, train=False):
    """Dense layer whose state counts the examples seen in training (a carry)."""
    y = x @ params["w"] + 0.0 * state["seen"]
    if train:
        state = {"seen": state["seen"] + x.shape[0]}
    return y, state


def test_state_is_carried_across_batches_and_reset_per_epoch():
    params = {"w": jnp.zeros((5, 3))}
    state = {"seen": jnp.zeros(())}
    data = blobs(24, seed=1)  # 3 batches of 8
    kw = dict(epochs=2, key=jax.random.key(0), batch_size=8, progress=False, print_fn=None)
    carried = fit(counting_model, params, state, optim.sgd(0.1), data, **kw)
    assert float(carried.state["seen"]) == 48
    seen_by_eval = []

    def eval_state(s):
        seen_by_eval.append(float(s["seen"]))
        return s

    reset = fit(counting_model, params, state, optim.sgd(0.1), data, eval_data=blobs(8),
                reset_state=lambda s: {"seen": jnp.zeros(())}, eval_state=eval_state, **kw)
    assert float(reset.state["seen"]) == 24
    assert seen_by_eval == [24.0, 24.0]
    both = fit(counting_model, params, state, optim.sgd(0.1), data, eval_data=blobs(8),
               reset_state=lambda s: {"seen": jnp.full((), -1.0)}, **kw)
    assert float(both.state["seen"]) == 23


class EpochSource:
    """A re-iterable source: ``epoch(e)`` gives that epoch's batches (a per-epoch offset, as
    the book's sequential sampler draws one)."""

    def __init__(self, x, y, bs):
        self.x, self.y, self.bs = x, y, bs

    def __len__(self):
        return len(self.x) // self.bs

    def epoch(self, e):
        off = e % self.bs
        for i in range(len(self)):
            rows = (np.arange(i * self.bs, (i + 1) * self.bs) + off) % len(self.x)
            yield self.x[rows], self.y[rows]


def test_reiterable_source_resumes_bitwise(tmp_path):
    model = tiny_mlp()
    params, state = init(model)
    src = EpochSource(*blobs(24, seed=1), 8)
    kw = dict(epochs=3, key=jax.random.key(0), progress=False, print_fn=None)
    ref = fit(model, params, state, optim.adam(0.05), src, **kw)

    def stop(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(model, params, state, optim.adam(0.05), src, checkpoint_dir=str(tmp_path),
            checkpoint_every_steps=2, callback=stop, **kw)
    res = fit(model, params, state, optim.adam(0.05), src, checkpoint_dir=str(tmp_path),
              checkpoint_every_steps=2, resume=True, **kw)
    assert res.steps == ref.steps == 9
    assert leaves_equal(res.params, ref.params) and leaves_equal(res.opt_state, ref.opt_state)
    assert res.history["train_loss"] == ref.history["train_loss"]


def test_trainer_alone():
    model = tiny_mlp()
    params, state = init(model)
    opt = optim.adam(0.05)
    loader = ArrayLoader(blobs(20, seed=1), 8, key=jax.random.key(1), last_batch="pad")
    step = make_train_step(model, opt)
    trainer = Trainer(step, loader, *jax.tree.map(jnp.copy, (params, state)), opt.init(params),
                      jax.random.key(0), eval_step=make_eval_step(model),
                      eval_data=ArrayLoader(blobs(12, seed=2), 12, last_batch="pad"))
    trainer.run(2)
    assert trainer.step == 6 and len(trainer.history) == 2 and trainer.epoch == 2
    assert "test_acc" in trainer.history.last
    trainer.run(3)  # continues from the position
    assert trainer.step == 9 and [r["epoch"] for r in trainer.history.rows] == [1, 2, 3]


def test_bert_pretraining_trains_with_an_objective():
    """BERT: tuple inputs, two losses (masked-LM mean over real positions + NSP mean)."""
    from fdl.models.sequence.bert import BertConfig, bert_pretraining

    cfg = BertConfig.d2l(vocab_size=20, num_hiddens=16, ffn_hiddens=32, num_heads=2,
                         num_layers=1, max_len=16, dropout=0.0)
    model = bert_pretraining(cfg)
    n, t, p = 24, 8, 3
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 20, (n, t)).astype(np.int32)
    segments = (np.arange(t) >= t // 2).astype(np.int32)[None].repeat(n, 0)
    valid = np.full(n, t, np.int32)
    positions = np.sort(rng.permuted(np.tile(np.arange(1, t), (n, 1)), axis=1)[:, :p], 1)
    positions = positions.astype(np.int32)
    labels = np.take_along_axis(tokens, positions, 1)
    weights = np.ones((n, p), np.float32)
    nsp = (tokens[:, 0] % 2).astype(np.int32)
    x, y = (tokens, segments, valid, positions), (labels, weights, nsp)
    _, params, state = model.init(jax.random.key(0), ((8, t), (8, t), (8,), (8, p)))

    def objective(out, y, mask):
        labels, weights, nsp = y
        m = jnp.ones(nsp.shape) if mask is None else mask
        ce = -jnp.take_along_axis(jax.nn.log_softmax(out.mlm_logits), labels[..., None], -1)
        w = weights * m[:, None]
        mlm = jnp.sum(ce[..., 0] * w) / jnp.sum(w)
        nce = -jnp.take_along_axis(jax.nn.log_softmax(out.nsp_logits), nsp[:, None], 1)[:, 0]
        return mlm + jnp.sum(nce * m) / jnp.sum(m), {"mlm": (jnp.sum(ce[..., 0] * w), jnp.sum(w)),
                                                      "nsp": jnp.sum(nce * m)}

    res = fit(model, params, state, optim.adam(1e-2), (x, y), epochs=3, key=jax.random.key(1),
              batch_size=8, loss=Objective(objective), progress=False, print_fn=None)
    mlm = res.history["train_mlm"]
    assert mlm[-1] < mlm[0]
    row = res.history.last
    assert row["train_loss"] == pytest.approx(row["train_mlm"] + row["train_nsp"], rel=1e-4)


def test_bad_losses_and_callbacks_are_refused_clearly():
    model = tiny_mlp(bn=False)
    params, state = init(model)
    opt = optim.sgd(0.1)
    batch, key = blobs(4), jax.random.key(0)

    def run(loss):
        make_train_step(model, opt, loss, donate=False)(params, state, opt.init(params), batch,
                                                        key)

    with pytest.raises(TypeError, match=r"must return \(loss, metrics\)"):
        run(Objective(lambda out, y, mask: jnp.sum(out)))
    with pytest.raises(ValueError, match="loss must be a scalar"):
        run(Objective(lambda out, y, mask: (out, {})))
    with pytest.raises(ValueError, match=r"\(losses, weights\)"):
        run(lambda out, y: (out[:, 0], out[:, 0], out[:, 0]))
    with pytest.raises(ValueError, match="must be equal"):
        run(lambda out, y: (out[:, 0], jnp.ones(3)))
    with pytest.raises(TypeError, match="must return a dict of sums"):
        make_train_step(model, opt, metrics=lambda o, y, m: 1.0, donate=False)(
            params, state, opt.init(params), batch, key)
    with pytest.raises(TypeError, match="fdl.train.Callback instances"):
        fit(model, params, state, opt, blobs(8), epochs=1, key=key, batch_size=4,
            callbacks=[lambda trainer: None], progress=False, print_fn=None)
