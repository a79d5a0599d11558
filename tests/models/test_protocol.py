"""Every model in fdl.models is a Layer (issue 15): a walk over the package finds every public
function that builds a Layer and runs init / apply / jax.jit / jax.grad on each; it also fails
on a model-like class outside the protocol and on a training loop outside fdl.train.

Every builder is traced abstractly (``jax.eval_shape`` traces init, apply, jit and grad without
computing or compiling); the sequence models of this package's d2l chapters also run for real
on small inputs (the vision zoo, detection, transformer and BERT have their own numerical
tests). A new
model builder must be added to ``_specs`` (or ``PARTS``) below: the discovery test says which
one is missing.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdl.models
from fdl import nn
from fdl.nn.core import Layer


def _tok(shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, size=shape), jnp.int32)


def _img(n, h, w, c):
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, h, w, c)), jnp.float32)


def _lens(values):
    return jnp.asarray(values, jnp.int32)


def _s2s_x():
    return (_tok((2, 5), 11), _lens([5, 3]), _tok((2, 4), 13, 1))


def _bert_cfg():
    from fdl.models.sequence.bert import BertConfig

    return BertConfig.d2l(20, num_hiddens=8, ffn_hiddens=16, num_heads=2, num_layers=1,
                          max_len=16)


def _bert_x(extra=()):
    return (_tok((2, 6), 20), jnp.zeros((2, 6), jnp.int32), _lens([6, 4]), *extra)


def _s2s_decoder_state(layer, params, state, x):
    """A decoder's state bound to a random encoder output (batch 2, 5 source steps, H 6)."""
    mem = jnp.ones((2, 5, 6), jnp.float32)
    h = jnp.ones((2, 2, 6), jnp.float32)
    return layer.bind(params, mem, {"rnn": {"h": h}}, _lens([5, 2]))


def _tf_decoder_state(layer, params, state, x):
    from fdl.models.sequence.transformer import decoder_state

    return decoder_state(jnp.ones((2, 5, 8), jnp.float32), _lens([5, 2]))


# name -> (builder, input, how: RUN | ABS, state_fn or None)
RUN, ABS = "run", "abstract"
Spec = tuple[Callable[[], Layer], Callable[[], Any], str, Callable | None]
S = "fdl.models.sequence"
V = "fdl.models.vision"
D = "fdl.models.detection"


def _specs() -> dict[str, Spec]:
    # modules by import path (package attributes may be functions of the same name)
    bert, nadaraya_watson, rnn_lm, seq2seq, transformer, encdec = (
        importlib.import_module(f"{S}.{m}") for m in
        ("bert", "nadaraya_watson", "rnn_lm", "seq2seq", "transformer", "encoder_decoder"))
    ssd, rcnn, yolo = (importlib.import_module(f"{D}.{m}") for m in ("ssd", "rcnn", "yolo"))
    _common, alexnet, densenet, googlenet, lenet, mobilenet, nin, resnet, vgg = (
        importlib.import_module(f"{V}.{m}") for m in
        ("_common", "alexnet", "densenet", "googlenet", "lenet", "mobilenet", "nin", "resnet",
         "vgg"))

    small = {"num_classes": 3, "in_channels": 3}
    return {
        # sequence models: run for real
        f"{S}.rnn_lm.rnn_lm": (lambda: rnn_lm.rnn_lm(9, 6, cell="lstm", num_layers=2),
                               lambda: _tok((2, 5), 9), RUN, None),
        f"{S}.seq2seq.seq2seq": (lambda: seq2seq.seq2seq(11, 13, embed_size=4, num_hiddens=6,
                                                         attention=True), _s2s_x, RUN, None),
        f"{S}.seq2seq.seq2seq_encoder": (lambda: seq2seq.seq2seq_encoder(11, 4, 6),
                                         lambda: _tok((2, 5), 11), ABS, None),
        f"{S}.seq2seq.seq2seq_decoder": (lambda: seq2seq.seq2seq_decoder(13, 4, 6),
                                         lambda: _tok((2, 4), 13), ABS, _s2s_decoder_state),
        f"{S}.seq2seq.attention_decoder": (lambda: seq2seq.attention_decoder(13, 4, 6),
                                           lambda: _tok((2, 4), 13), ABS,
                                           _s2s_decoder_state),
        f"{S}.encoder_decoder.encoder_decoder": (
            lambda: encdec.encoder_decoder(seq2seq.seq2seq_encoder(11, 4, 6),
                                           seq2seq.seq2seq_decoder(13, 4, 6)),
            _s2s_x, ABS, None),
        f"{S}.nadaraya_watson.nadaraya_watson_regression": (
            nadaraya_watson.nadaraya_watson_regression,
            lambda: (jnp.linspace(0, 1, 4, dtype=jnp.float32), jnp.ones((4, 3), jnp.float32),
                     jnp.ones((4, 3), jnp.float32)), RUN, None),
        f"{S}.transformer.transformer": (
            lambda: transformer.transformer(11, 13, 8, 16, 2, 1, max_len=16), _s2s_x, ABS,
            None),
        f"{S}.transformer.transformer_encoder": (
            lambda: transformer.transformer_encoder(11, 8, 16, 2, 1, max_len=16),
            lambda: _tok((2, 5), 11), ABS, None),
        f"{S}.transformer.transformer_decoder": (
            lambda: transformer.transformer_decoder(13, 8, 16, 2, 1, max_len=16),
            lambda: _tok((2, 4), 13), ABS, _tf_decoder_state),
        f"{S}.bert.bert_encoder": (lambda: bert.bert_encoder(_bert_cfg()), _bert_x, ABS, None),
        f"{S}.bert.bert_pretraining": (lambda: bert.bert_pretraining(_bert_cfg()),
                                       lambda: _bert_x((_lens([[1, 2], [0, 3]]),)), ABS, None),
        f"{S}.bert.bert_classifier": (lambda: bert.bert_classifier(_bert_cfg(), 3), _bert_x,
                                      ABS, None),
        f"{S}.bert.bert_tagger": (lambda: bert.bert_tagger(_bert_cfg(), 3), _bert_x, ABS, None),
        f"{S}.bert.bert_qa": (lambda: bert.bert_qa(_bert_cfg()), _bert_x, ABS, None),
        # detection (numerical tests in tests/models/test_detection_*.py), abstractly
        f"{D}.ssd.tiny_ssd": (lambda: ssd.tiny_ssd(2), lambda: _img(1, 64, 64, 3), ABS, None),
        f"{D}.ssd.base_net": (ssd.base_net, lambda: _img(1, 16, 16, 3), ABS, None),
        f"{D}.ssd.down_sample_blk": (lambda: ssd.down_sample_blk(4), lambda: _img(1, 8, 8, 3),
                                     ABS, None),
        f"{D}.rcnn.faster_rcnn": (
            lambda: rcnn.faster_rcnn(2, backbone=nn.conv2d(4, 3, stride=8, padding=1), stride=8,
                                     anchor_sizes=(16,), rpn_pre_nms_top_n_test=16,
                                     rpn_post_nms_top_n_test=8, detections_per_image=4,
                                     hidden=8, roi_size=2),
            lambda: _img(1, 32, 32, 3), ABS, None),
        f"{D}.rcnn.rpn_head": (lambda: rcnn.rpn_head(3), lambda: _img(1, 4, 4, 4), ABS, None),
        f"{D}.rcnn.roi_box_head": (lambda: rcnn.roi_box_head(2, hidden=8),
                                   lambda: _img(3, 2, 2, 4), ABS, None),
        f"{D}.rcnn.resnet_trunk": (lambda: rcnn.resnet_trunk("resnet18", stage=1)[0],
                                   lambda: _img(1, 32, 32, 3), ABS, None),
        f"{D}.yolo.yolo": (lambda: yolo.yolo(2, backbone=nn.conv2d(4, 3, stride=8, padding=1)),
                           lambda: _img(1, 32, 32, 3), ABS, None),
        f"{D}.yolo.yolo_head": (lambda: yolo.yolo_head(2), lambda: _img(1, 4, 4, 8), ABS, None),
        # vision: the zoo abstractly at its usual input sizes
        f"{V}.lenet.lenet5": (lenet.lenet5, lambda: _img(2, 28, 28, 1), ABS, None),
        f"{V}.alexnet.alexnet": (lambda: alexnet.alexnet(3, 1), lambda: _img(1, 224, 224, 1),
                                 ABS, None),
        f"{V}.alexnet.alexnet_torchvision": (lambda: alexnet.alexnet_torchvision(3),
                                             lambda: _img(1, 224, 224, 3), ABS, None),
        f"{V}.densenet.densenet": (lambda: densenet.densenet((2, 2), **small),
                                   lambda: _img(1, 32, 32, 3), ABS, None),
        f"{V}.densenet.densenet121": (lambda: densenet.densenet121(**small),
                                      lambda: _img(1, 64, 64, 3), ABS, None),
        f"{V}.densenet.densenet161": (lambda: densenet.densenet161(**small),
                                      lambda: _img(1, 64, 64, 3), ABS, None),
        f"{V}.densenet.densenet169": (lambda: densenet.densenet169(**small),
                                      lambda: _img(1, 64, 64, 3), ABS, None),
        f"{V}.densenet.densenet201": (lambda: densenet.densenet201(**small),
                                      lambda: _img(1, 64, 64, 3), ABS, None),
        f"{V}.densenet.densenet_book": (densenet.densenet_book, lambda: _img(1, 96, 96, 1),
                                        ABS, None),
        f"{V}.googlenet.googlenet": (googlenet.googlenet, lambda: _img(1, 96, 96, 1),
                                     ABS, None),
        f"{V}.googlenet.googlenet_torchvision": (lambda: googlenet.googlenet_torchvision(3),
                                                 lambda: _img(1, 64, 64, 3), ABS, None),
        f"{V}.mobilenet.mobilenet_v1": (lambda: mobilenet.mobilenet_v1(**small),
                                        lambda: _img(1, 64, 64, 3), ABS, None),
        f"{V}.mobilenet.mobilenet_v2": (lambda: mobilenet.mobilenet_v2(**small),
                                        lambda: _img(1, 64, 64, 3), ABS, None),
        f"{V}.mobilenet.mobilenet_v3_large": (
            lambda: mobilenet.mobilenet_v3_large(**small, small_input=True),
            lambda: _img(1, 32, 32, 3), ABS, None),
        f"{V}.mobilenet.mobilenet_v3_small": (
            lambda: mobilenet.mobilenet_v3_small(**small, small_input=True),
            lambda: _img(1, 32, 32, 3), ABS, None),
        f"{V}.nin.nin": (nin.nin, lambda: _img(1, 224, 224, 1), ABS, None),
        f"{V}.resnet.resnet": (lambda: resnet.resnet("basic", (1, 1), **small),
                               lambda: _img(1, 32, 32, 3), ABS, None),
        f"{V}.resnet.resnet18": (lambda: resnet.resnet18(**small), lambda: _img(1, 32, 32, 3),
                                 ABS, None),
        f"{V}.resnet.resnet34": (lambda: resnet.resnet34(**small), lambda: _img(1, 32, 32, 3),
                                 ABS, None),
        f"{V}.resnet.resnet50": (lambda: resnet.resnet50(**small), lambda: _img(1, 32, 32, 3),
                                 ABS, None),
        f"{V}.resnet.resnet101": (lambda: resnet.resnet101(**small), lambda: _img(1, 32, 32, 3),
                                  ABS, None),
        f"{V}.resnet.resnet152": (lambda: resnet.resnet152(**small), lambda: _img(1, 32, 32, 3),
                                  ABS, None),
        f"{V}.resnet.resnext101_32x8d": (lambda: resnet.resnext101_32x8d(**small),
                                         lambda: _img(1, 32, 32, 3), ABS, None),
        f"{V}.resnet.resnext101_64x4d": (lambda: resnet.resnext101_64x4d(**small),
                                         lambda: _img(1, 32, 32, 3), ABS, None),
        f"{V}.resnet.wide_resnet50_2": (lambda: resnet.wide_resnet50_2(**small),
                                        lambda: _img(1, 32, 32, 3), ABS, None),
        f"{V}.resnet.wide_resnet101_2": (lambda: resnet.wide_resnet101_2(**small),
                                         lambda: _img(1, 32, 32, 3), ABS, None),
        f"{V}.resnet.resnext50_32x4d": (lambda: resnet.resnext50_32x4d(**small),
                                        lambda: _img(1, 32, 32, 3), ABS, None),
        f"{V}.vgg.vgg": (lambda: vgg.vgg(((1, 8), (1, 16)), num_classes=3, in_channels=1),
                         lambda: _img(1, 224, 224, 1), ABS, None),
        f"{V}.vgg.vgg11": (lambda: vgg.vgg11(3), lambda: _img(1, 224, 224, 3), ABS, None),
        f"{V}.vgg.vgg13": (lambda: vgg.vgg13(3), lambda: _img(1, 224, 224, 3), ABS, None),
        f"{V}.vgg.vgg16": (lambda: vgg.vgg16(3), lambda: _img(1, 224, 224, 3), ABS, None),
        f"{V}.vgg.vgg19": (lambda: vgg.vgg19(3), lambda: _img(1, 224, 224, 3), ABS, None),
        # building blocks (parts of the zoo), abstractly
        f"{V}.densenet.dense_layer": (lambda: densenet.dense_layer(4),
                                      lambda: _img(1, 8, 8, 3), ABS, None),
        f"{V}.densenet.dense_block": (lambda: densenet.dense_block(2, 4),
                                      lambda: _img(1, 8, 8, 3), ABS, None),
        f"{V}.densenet.transition": (lambda: densenet.transition(4), lambda: _img(1, 8, 8, 3),
                                     ABS, None),
        f"{V}.googlenet.inception": (lambda: googlenet.inception(2, (2, 3), (2, 3), 2),
                                     lambda: _img(1, 8, 8, 3), ABS, None),
        f"{V}.mobilenet.depthwise_separable": (lambda: mobilenet.depthwise_separable(3, 4),
                                               lambda: _img(1, 8, 8, 3), ABS, None),
        f"{V}.googlenet.inception_bn": (lambda: googlenet.inception_bn(2, (2, 3), (2, 3), 2),
                                        lambda: _img(1, 8, 8, 3), ABS, None),
        f"{V}.mobilenet.squeeze_excite": (lambda: mobilenet.squeeze_excite(4, 2),
                                          lambda: _img(1, 8, 8, 4), ABS, None),
        f"{V}.mobilenet.inverted_residual_v3": (
            lambda: mobilenet.inverted_residual_v3(3, 3, 6, 3, True, "HS", 1),
            lambda: _img(1, 8, 8, 3), ABS, None),
        f"{V}.mobilenet.inverted_residual": (lambda: mobilenet.inverted_residual(3, 3, 1, 2),
                                             lambda: _img(1, 8, 8, 3), ABS, None),
        f"{V}.nin.nin_block": (lambda: nin.nin_block(4, 3, 1, 1), lambda: _img(1, 8, 8, 3),
                               ABS, None),
        f"{V}.resnet.basic_block": (lambda: resnet.basic_block(4, 2), lambda: _img(1, 8, 8, 3),
                                    ABS, None),
        f"{V}.resnet.bottleneck_block": (lambda: resnet.bottleneck_block(2, 2),
                                         lambda: _img(1, 8, 8, 3), ABS, None),
        f"{V}.resnet.se_block": (lambda: resnet.se_block(2), lambda: _img(1, 8, 8, 4),
                                 ABS, None),
        f"{V}.vgg.vgg_block": (lambda: vgg.vgg_block(1, 4), lambda: _img(1, 8, 8, 3),
                               ABS, None),
        f"{V}._common.conv_bn_act": (lambda: _common.conv_bn_act(4, 3, padding=1),
                                     lambda: _img(1, 8, 8, 3), ABS, None),
        f"{V}._common.relu6": (_common.relu6, lambda: _img(1, 4, 4, 2), ABS, None),
    }


# Layer-returning helpers that wrap a model given to them (tested with the zoo's own tests)
PARTS = {f"{V}._common.classifier", f"{V}._common.replace_head", f"{V}._common.flat_block"}


def _public(mod):
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n in vars(mod) if not n.startswith("_")]
    for n in names:
        obj = getattr(mod, n, None)
        if obj is not None and getattr(obj, "__module__", None) == mod.__name__:
            yield n, obj


def _modules():
    for info in pkgutil.walk_packages(fdl.models.__path__, "fdl.models."):
        yield importlib.import_module(info.name)


def _returns_layer(fn) -> bool:
    ann = inspect.signature(fn).return_annotation
    text = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    return any(w in text for w in ("Layer", "Decoder", "EncoderDecoder"))


def test_every_model_builder_is_covered_and_no_model_lives_outside_the_protocol():
    specs = _specs()
    found, outside, loops = set(), [], []
    for mod in _modules():
        for name, obj in _public(mod):
            qual = f"{mod.__name__}.{name}"
            if inspect.isfunction(obj):
                if name.startswith(("train_", "fit_")):
                    loops.append(qual)
                elif _returns_layer(obj):
                    found.add(qual)
            elif inspect.isclass(obj) and hasattr(obj, "apply") and hasattr(obj, "init") \
                    and not issubclass(obj, Layer):
                outside.append(qual)
    assert not outside, f"model classes outside the layer protocol: {outside}"
    assert not loops, f"training loops outside fdl.train: {loops}"
    missing = sorted(found - set(specs) - PARTS)
    assert not missing, f"Layer builders without a protocol check: add them to SPECS: {missing}"
    stale = sorted(set(specs) - found)
    assert not stale, f"SPECS entries that are no longer public Layer builders: {stale}"


def _scalar(y) -> jax.Array:
    leaves = [a for a in jax.tree_util.tree_leaves(y) if jnp.issubdtype(a.dtype, jnp.floating)]
    return sum(jnp.sum(jnp.sin(a.astype(jnp.float32))) for a in leaves)


def _check(layer: Layer, x, state_fn):
    in_shape = jax.tree_util.tree_map(lambda a: tuple(a.shape), x)
    if isinstance(in_shape, list):
        in_shape = tuple(in_shape)
    out_shape, params, state = layer.init(jax.random.key(0), in_shape)
    if state_fn is not None:
        state = state_fn(layer, params, state, x)
    y, new_state = jax.jit(lambda p, s, x: layer.apply(p, s, x))(params, state, x)
    if isinstance(out_shape, tuple) and all(isinstance(d, int) for d in out_shape):
        assert tuple(jnp.shape(y)) == out_shape
    # state crossing calls keeps its structure and shapes (so fit can thread it)
    assert jax.tree_util.tree_map(jnp.shape, new_state) == jax.tree_util.tree_map(jnp.shape,
                                                                                  state)
    grads = jax.jit(jax.grad(lambda p, s, x: _scalar(layer.apply(p, s, x)[0])))(params, state, x)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    return y, grads


# compiling a real run of the recurrent models takes 5-20 s on 2 cores: they are traced by
# default (below) and trained for real by tests/models/test_rnn_lm.py and test_seq2seq.py
SLOW_RUNS = {f"{S}.rnn_lm.rnn_lm", f"{S}.seq2seq.seq2seq"}


@pytest.mark.parametrize("name", [
    pytest.param(k, marks=pytest.mark.slow) if k in SLOW_RUNS else k
    for k in sorted(k for k, v in _specs().items() if v[2] == RUN)])
def test_model_runs_init_apply_jit_grad(name):
    build, make_x, _, state_fn = _specs()[name]
    y, grads = _check(build(), make_x(), state_fn)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(y))
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert any(np.any(np.asarray(g) != 0) for g in leaves)


# tracing these takes > 3 s each; one model per family stays in the default run
SLOW = {f"{V}.densenet.densenet121", f"{V}.densenet.densenet161", f"{V}.densenet.densenet169",
        f"{V}.densenet.densenet201", f"{V}.resnet.resnet101", f"{V}.resnet.resnet152",
        f"{V}.resnet.resnext101_32x8d", f"{V}.resnet.resnext101_64x4d",
        f"{V}.resnet.wide_resnet101_2", f"{V}.vgg.vgg16", f"{V}.vgg.vgg19",
        f"{V}.mobilenet.mobilenet_v3_large", f"{V}.googlenet.googlenet_torchvision"}


@pytest.mark.parametrize("name", [
    pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in sorted(_specs())])
def test_model_traces_init_apply_jit_grad(name):
    build, make_x, _, state_fn = _specs()[name]
    layer, x = build(), make_x()
    x = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)
    jax.eval_shape(lambda x: _check(layer, x, state_fn), x)


def test_nn_layers_used_by_the_models_are_layers():
    """The recurrent layers the sequence models build on carry their state as layer state."""
    layer = nn.gru(3)
    _, _, state = layer.init(jax.random.key(0), (2, 4, 5))
    assert set(state) == {"h"}
