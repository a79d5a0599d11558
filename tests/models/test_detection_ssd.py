"""TinySSD: shapes, equality with the book's PyTorch model (forward in both modes, loss,
gradients and one SGD step with weight decay), the loss options and their gradients, fit."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdl.testing as ft
from fdl import optim, train
from fdl.models import detection as D
from fdl.nn.tree import flatten_dict, unflatten_dict

torch = pytest.importorskip("torch")
from scripts.bench.references import tinyssd_torch as book  # noqa: E402  (the book's code)


def test_shapes_and_param_names():
    net = D.tiny_ssd(num_classes=2)
    holder = {}

    def run(k):
        holder["out"], p, s = net.init(k, (4, 256, 256, 3))
        return p, s

    params, state = jax.eval_shape(run, jax.random.key(0))
    out = holder["out"]
    assert out == ((5444, 4), (4, 5444, 3), (4, 5444 * 4))
    (anchors, cls, box), _ = jax.eval_shape(
        lambda p, s, x: net.apply(p, s, x), params, state,
        jax.ShapeDtypeStruct((4, 256, 256, 3), jnp.float32))
    assert (anchors.shape, cls.shape, box.shape) == out
    names = set(flatten_dict(params))
    assert {"blk_0/0/0/w", "blk_0/2/4/scale", "blk_3/3/w", "cls_4/b", "bbox_0/w"} <= names
    assert "blk_4" not in params  # the global max-pool has no params


def _torch_to_fdl(model, params, state):
    """Copy the book's PyTorch TinySSD weights into fdl's trees (OIHW -> HWIO)."""
    flat_p, flat_s = flatten_dict(params), flatten_dict(state)
    out_p, out_s = {}, {}
    names = {"w": "weight", "b": "bias", "scale": "weight", "offset": "bias"}
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for path in flat_p:
        *mod, leaf = path.split("/")
        a = sd[".".join(mod) + "." + names[leaf]]
        out_p[path] = jnp.asarray(a.transpose(2, 3, 1, 0) if a.ndim == 4 else a)
    for path in flat_s:
        *mod, leaf = path.split("/")
        out_s[path] = jnp.asarray(sd[".".join(mod) + ".running_" + leaf])
    return unflatten_dict(out_p), unflatten_dict(out_s)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = book.TinySSD(num_classes=2)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    net = D.tiny_ssd(num_classes=2)
    # only the structure is needed: every array comes from the PyTorch model
    params, state = jax.eval_shape(lambda k: net.init_params(k, (3, 64, 64, 3)),
                                   jax.random.key(0))
    params, state = _torch_to_fdl(model, params, state)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (3, 64, 64, 3)).astype(np.float32)
    y = np.full((3, 2, 5), -1, np.float32)
    y[:, 0] = [[0, 0.1, 0.1, 0.5, 0.6], [1, 0.3, 0.2, 0.9, 0.7], [1, 0.0, 0.4, 0.3, 0.9]]
    y[0, 1] = [1, 0.5, 0.5, 0.95, 0.9]
    return model, net, params, state, x, y


def _torch_loss(model, x, y):
    anchors, cls_preds, bbox_preds = model(torch.tensor(x).permute(0, 3, 1, 2))
    per_image = [torch.tensor(r[r[:, 0] >= 0]) for r in y]
    bbox_labels, bbox_masks, cls_labels = book.multibox_target(anchors, per_image)
    return book.calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks).mean()


@pytest.mark.parametrize("training", [False, True])
def test_forward_equals_book(pair, training):
    model, net, params, state, x, _ = pair
    model = copy.deepcopy(model)  # a training-mode forward updates the running statistics
    model.train(training)
    with torch.no_grad():
        anchors, cls, box = model(torch.tensor(x).permute(0, 3, 1, 2))
    (a, c, b), _ = jax.jit(net.apply, static_argnames="train")(params, state, x, train=training)
    np.testing.assert_allclose(np.asarray(a), anchors[0].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(c), cls.numpy(), rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(b), box.numpy(), rtol=1e-4, atol=2e-4)


def test_loss_gradients_and_sgd_step_equal_book(pair):
    """One SGD step (lr 0.2, weight decay 5e-4) in float64 on both sides: the parameter updates
    (-lr * (gradient + wd * param)) and BatchNorm statistics equal PyTorch's to 1e-9 of each
    leaf's largest update (float32 differed by summation order alone: 1e-4 of the gradient)."""
    model, net, params, state, x, y = pair
    model = copy.deepcopy(model).double()
    model.train(True)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the book's anchors are built from Python lists
    try:
        opt_t = torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=5e-4)
        opt_t.zero_grad()
        loss_t = _torch_loss(model, x.astype(np.float64), y.astype(np.float64))
        loss_t.backward()
        opt_t.step()
    finally:
        torch.set_default_dtype(old)

    with jax.enable_x64(True):
        params64, state64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, state))
        opt = optim.sgd(0.2, weight_decay=5e-4)
        step = train.make_train_step(net, opt, D.ssd_loss, donate=False)
        data = (jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64))
        p2, s2, _, metrics = step(params64, state64, opt.init(params64), data,
                                  jax.random.key(0))
        # the step's loss metric is kept in float32
        assert abs(float(metrics["loss"]) / 3 - loss_t.item()) < 1e-6 * max(1, loss_t.item())
        new_p, new_s = _torch_to_fdl(model, params64, state64)
        for new, ref, old_tree in ((p2, new_p, params64), (s2, new_s, state64)):
            flat_new, flat_ref = flatten_dict(new), flatten_dict(ref)
            for path, v in flatten_dict(old_tree).items():
                assert flat_new[path].dtype == jnp.float64, path
                delta = np.asarray(flat_new[path]) - np.asarray(v)
                delta_ref = np.asarray(flat_ref[path]) - np.asarray(v)
                scale = np.abs(delta_ref).max()
                assert scale > 0, path  # every leaf moved: the comparison below means something
                np.testing.assert_allclose(delta, delta_ref, rtol=0, atol=1e-9 * scale,
                                           err_msg=path)


def test_focal_with_gamma_zero_is_cross_entropy_and_smooth_l1_small_errors():
    rng = np.random.default_rng(1)
    anchors = D.multibox_prior((4, 4), [0.3, 0.5], [1, 2])
    a = anchors.shape[0]
    out = (anchors, jnp.asarray(rng.normal(size=(2, a, 3)), jnp.float32),
           jnp.asarray(rng.normal(size=(2, a * 4)) * 0.01, jnp.float32))
    y = np.array([[[0, 0.1, 0.1, 0.6, 0.5]], [[1, 0.4, 0.3, 0.9, 0.9]]], np.float32)
    losses = [D.ssd_loss, D.make_ssd_loss(cls_loss="focal", focal_gamma=0.0),
              D.make_ssd_loss(cls_loss="focal"), D.make_ssd_loss(box_loss="smooth_l1"),
              D.make_ssd_loss(box_weight=0.0)]
    ce, focal0, focal, smooth, cls_only = map(np.asarray, jax.jit(
        lambda out, y: [f(out, y) for f in losses])(out, y))
    np.testing.assert_allclose(focal0, ce, rtol=1e-6)
    assert np.all(focal < ce)
    assert np.all((cls_only < smooth) & (smooth < ce))  # 0 < smooth-L1 < L1 (beta = 1)
    with pytest.raises(ValueError, match="cls_loss"):
        D.make_ssd_loss(cls_loss="hinge")
    with pytest.raises(ValueError, match="gamma"):
        D.focal_loss(out[1], jnp.zeros((2, a), jnp.int32), gamma=-1.0)


@pytest.mark.parametrize("options", [{}, {"cls_loss": "focal", "focal_alpha": 0.25,
                                           "box_loss": "smooth_l1", "smooth_l1_beta": 0.5}])
def test_loss_gradients_float64(options):
    rng = np.random.default_rng(2)
    anchors = D.multibox_prior((3, 3), [0.3, 0.5], [1, 2]).astype(jnp.float64)
    a = anchors.shape[0]
    cls = jnp.asarray(rng.normal(size=(2, a, 3)))
    # offsets away from the kinks of |d| and of smooth-L1 (d never near 0 or +-beta)
    box = jnp.asarray(rng.uniform(0.6, 0.9, (2, a * 4)) * rng.choice([-1, 1], (2, a * 4)) + 3)
    y = np.array([[[0, 0.1, 0.1, 0.6, 0.5]], [[1, 0.4, 0.3, 0.9, 0.9]]])
    loss = D.make_ssd_loss(**options)
    fn = jax.jit(lambda c, b: jnp.sum(loss((anchors, c, b), y)))
    ft.check_gradients(fn, (cls, box), order=1, dense_check_max_size=0)


@pytest.mark.slow  # ~25 s of compilation; the step fit runs is checked against PyTorch above
def test_fit_trains_tiny_ssd_and_metrics():
    rng = np.random.default_rng(3)
    n = 16
    x = rng.uniform(0, 0.2, (n, 64, 64, 3)).astype(np.float32)
    y = np.zeros((n, 1, 5), np.float32)
    for i in range(n):  # a bright square on a dark background
        s = rng.integers(16, 32)
        x0, y0 = rng.integers(0, 64 - s, 2)
        x[i, y0:y0 + s, x0:x0 + s] = 1.0
        y[i, 0] = [0, x0 / 64, y0 / 64, (x0 + s) / 64, (y0 + s) / 64]
    net = D.tiny_ssd(1)
    params, state = jax.jit(net.init_params, static_argnums=1)(jax.random.key(1), (8, 64, 64, 3))
    def metrics(out, y, mask):
        m = D.ssd_metrics(out, y)
        return {"class_err": (m["cls_count"] - m["cls_correct"], m["cls_count"]),
                "bbox_mae": (m["bbox_abs_err"], m["bbox_count"])}

    res = train.fit(net, params, state, optim.sgd(0.2, weight_decay=5e-4), (x, y),
                    loss=D.ssd_loss, metrics=metrics, batch_size=8, epochs=3,
                    key=jax.random.key(2), print_fn=None)
    losses = res.history["train_loss"]
    assert losses[-1] < losses[0]
    assert 0 <= res.history.last["train_class_err"] < 0.5
    assert 0 <= res.history.last["train_bbox_mae"] < 1
    out, m = jax.jit(lambda p, s, x, y: (lambda o: (o, D.ssd_metrics(o, y)))(
        net.apply(p, s, x)[0]))(res.params, res.state, x[:4], y[:4])
    assert float(m["cls_count"]) == 4 * out[1].shape[1]
    assert 0 <= float(m["cls_correct"]) <= float(m["cls_count"])
    det = jax.jit(lambda p, s, im: D.ssd_detect(net, p, s, im))(res.params, res.state, x[:2])
    assert det.shape == (2, out[1].shape[1], 6)
