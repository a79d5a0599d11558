"""torchvision-layout weights <-> fdl params and state for every torchvision classification
model whose architecture the zoo has (``SUPPORTED``: ResNet-18/34/50/101/152, ResNeXt-50 32x4d,
ResNeXt-101 32x8d/64x4d, Wide ResNet-50-2/101-2, VGG-11/13/16/19 with and without BatchNorm,
AlexNet, DenseNet-121/161/169/201, GoogLeNet, MobileNet v2, MobileNet v3 Large/Small);
torchvision itself is not needed.

Conversion rules (per leaf, from the fdl model's own param/state tree):
- module names: fdl ``features/layer1/0/conv1`` <-> torch ``layer1.0.conv1`` (ResNet),
  ``features/block2/conv1`` <-> ``features.3`` (VGG, from the architecture spec),
  ``features/conv3`` <-> ``features.6`` (AlexNet), ``features/denseblock1/denselayer1/norm1``
  <-> ``features.denseblock1.denselayer1.norm1`` (DenseNet), ``features/inception3a/branch2/
  0/conv`` <-> ``inception3a.branch2.0.conv`` (GoogLeNet), ``features/block3/dw/bn`` <->
  ``features.3.conv.1.1`` (MobileNet v2) / ``features.3.block.1.1`` (v3); the head is ``fc``
  (ResNet, GoogLeNet), ``classifier.6`` (VGG, AlexNet), ``classifier`` (DenseNet),
  ``classifier.1`` (MobileNet v2) or ``classifier.3`` (v3, whose ``classifier.0`` is fdl's
  ``features/fc1``); GoogLeNet's auxiliary classifiers (``aux1.*``, ``aux2.*``, in
  torchvision's pretrained file) are ignored on import;
- conv ``w`` (HWIO) <-> ``weight`` (OIHW): ``w = weight.transpose(2, 3, 1, 0)`` (MobileNet v3's
  squeeze-excite 1x1 convs are fdl dense layers: ``w = weight[:, :, 0, 0].T``); dense ``w``
  ``(in, out)`` <-> ``weight`` ``(out, in)``; the first fully connected layer of VGG/AlexNet
  also reorders its inputs from torch's flattened ``(C, H, W)`` to fdl's ``(H, W, C)``;
- ``b`` <-> ``bias``; BatchNorm ``scale``/``offset`` <-> ``weight``/``bias``, state
  ``mean``/``var`` <-> ``running_mean``/``running_var``; ``num_batches_tracked`` is ignored on
  import and written as 0 on export (so ``load_state_dict(strict=True)`` accepts it).

Every missing, unexpected or mis-shaped key is reported by name in one
:class:`~fdl.interop.state_dict.StateDictError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdl.interop.state_dict import StateDictError, load_state_dict
from fdl.models import vision
from fdl.nn.core import Layer
from fdl.tree import flatten_dict, unflatten_dict

__all__ = ["SUPPORTED", "torchvision_model", "from_torchvision", "to_torchvision",
           "torchvision_key_map"]


def _vgg_builder(arch, bn):
    return lambda nc=1000, **kw: vision.vgg(arch, nc, batch_norm=bn, **kw)


_BUILDERS: dict[str, Callable[..., Layer]] = {
    "resnet18": vision.resnet18, "resnet34": vision.resnet34, "resnet50": vision.resnet50,
    "resnet101": vision.resnet101, "resnet152": vision.resnet152,
    "resnext50_32x4d": vision.resnext50_32x4d, "resnext101_32x8d": vision.resnext101_32x8d,
    "resnext101_64x4d": vision.resnext101_64x4d, "wide_resnet50_2": vision.wide_resnet50_2,
    "wide_resnet101_2": vision.wide_resnet101_2,
    **{f"vgg{d}{sfx}": _vgg_builder(arch, bool(sfx))
       for d, arch in ((11, vision.VGG11_ARCH), (13, vision.VGG13_ARCH),
                       (16, vision.VGG16_ARCH), (19, vision.VGG19_ARCH))
       for sfx in ("", "_bn")},
    "alexnet": vision.alexnet_torchvision,
    "densenet121": vision.densenet121, "densenet161": vision.densenet161,
    "densenet169": vision.densenet169, "densenet201": vision.densenet201,
    "googlenet": vision.googlenet_torchvision,
    "mobilenet_v2": vision.mobilenet_v2,
    "mobilenet_v3_large": vision.mobilenet_v3_large,
    "mobilenet_v3_small": vision.mobilenet_v3_small,
}
SUPPORTED = tuple(_BUILDERS)
_HEAD_KEY = {"resnet": "fc", "vgg": "classifier.6", "alexnet": "classifier.6",
             "densenet": "classifier", "googlenet": "fc", "mobilenet_v2": "classifier.1",
             "mobilenet_v3": "classifier.3"}
_FC1_KEY = {"vgg": "classifier.0", "alexnet": "classifier.1"}
# torch's flattened (C, H, W) input of the first fully connected layer
_FC1_CHW = {"vgg": (512, 7, 7), "alexnet": (256, 6, 6)}
# keys a torchvision state dict may carry that the fdl model does not use (GoogLeNet's
# auxiliary classifiers, which only its training uses)
_IGNORED = {"googlenet": ("aux1.", "aux2.")}
_LEAF = {"w": "weight", "b": "bias", "scale": "weight", "offset": "bias",
         "mean": "running_mean", "var": "running_var"}
_ALEXNET_CONV = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}


def _family(name: str) -> str:
    if name not in SUPPORTED:
        raise ValueError(f"unsupported torchvision model {name!r}; supported: {SUPPORTED}")
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return "resnet"
    if name.startswith("mobilenet"):
        return name[:12]  # mobilenet_v2 / mobilenet_v3
    return re.match(r"[a-z]+", name).group(0)


def torchvision_model(name: str, num_classes: int = 1000, **kw: Any) -> Layer:
    """The fdl model with torchvision ``name``'s architecture (``"resnet18"``, ...)."""
    _family(name)
    return _BUILDERS[name](num_classes, **kw)


def _vgg_index(name: str) -> dict[str, int]:
    arch = {"11": vision.VGG11_ARCH, "13": vision.VGG13_ARCH, "16": vision.VGG16_ARCH,
            "19": vision.VGG19_ARCH}[re.match(r"vgg(\d+)", name).group(1)]
    bn = name.endswith("_bn")
    out, idx = {}, 0
    for b, (n, _) in enumerate(arch, 1):
        for j in range(1, n + 1):
            out[f"block{b}/conv{j}"] = idx
            if bn:
                out[f"block{b}/bn{j}"] = idx + 1
            idx += 3 if bn else 2  # conv, [bn,] relu
        idx += 1  # max-pool
    return out


def _mobilenet_module(fam: str, rest: str, modules: set[str]) -> str | None:
    """MobileNet v2/v3: ``stem`` -> ``features.0``, ``block{i}`` -> ``features.{i}``, the
    last conv -> ``features.{n + 1}``; inside a block the parts are numbered in order (v2:
    ``conv.{j}``, the projection conv and BN as two entries; v3: ``block.{j}``)."""
    parts = rest.split("/")
    n_blocks = len({m.split("/")[1] for m in modules if m.startswith("features/block")})
    if parts[0] == "stem" or parts[0] == "last":
        i = 0 if parts[0] == "stem" else n_blocks + 1
        return f"features.{i}.{0 if parts[1] == 'conv' else 1}"
    if parts[0] == "fc1" and fam == "mobilenet_v3":
        return "classifier.0"
    m = re.fullmatch(r"block(\d+)", parts[0])
    if m is None or len(parts) != 3:
        return None
    block = f"features/{parts[0]}"
    order = [p for p in ("expand", "dw", "se", "project") if any(
        x.startswith(f"{block}/{p}/") for x in modules)]
    j = order.index(parts[1])
    if fam == "mobilenet_v2":
        if parts[1] == "project":
            return f"features.{m.group(1)}.conv.{j + (0 if parts[2] == 'conv' else 1)}"
        return f"features.{m.group(1)}.conv.{j}.{0 if parts[2] == 'conv' else 1}"
    if parts[1] == "se":
        return f"features.{m.group(1)}.block.{j}.{parts[2]}"
    return f"features.{m.group(1)}.block.{j}.{0 if parts[2] == 'conv' else 1}"


def _module_fn(name: str, modules: set[str]) -> Callable[[str], str | None]:
    """fdl module path (``features/layer1/0/conv1``) -> torch module prefix (or None)."""
    fam = _family(name)
    vgg_idx = _vgg_index(name) if fam == "vgg" else {}

    def fn(module: str) -> str | None:
        if module == "head" or (module == "head/fc" and fam == "mobilenet_v2"):
            return _HEAD_KEY[fam]
        if not module.startswith("features/"):
            return None
        rest = module[len("features/"):]
        if fam == "resnet":
            rest = re.sub(r"/downsample/conv$", "/downsample/0", rest)
            rest = re.sub(r"/downsample/bn$", "/downsample/1", rest)
            return rest.replace("/", ".")
        if fam == "densenet":
            return "features." + rest.replace("/", ".")
        if fam == "googlenet":
            return rest.replace("/", ".")
        if fam.startswith("mobilenet"):
            return _mobilenet_module(fam, rest, modules)
        if rest == "fc1":
            return _FC1_KEY[fam]
        if rest == "fc2":
            return "classifier.3" if fam == "vgg" else "classifier.4"
        if fam == "vgg" and rest in vgg_idx:
            return f"features.{vgg_idx[rest]}"
        if fam == "alexnet" and rest in _ALEXNET_CONV:
            return f"features.{_ALEXNET_CONV[rest]}"
        return None

    return fn


def _entries(name: str, params, state):
    """``(collection, fdl_path, torch_key, kind, fdl_shape)`` for every leaf."""
    fam = _family(name)
    flat = {c: flatten_dict(t) for c, t in (("params", params), ("state", state))}
    module_fn = _module_fn(name, {p.rsplit("/", 1)[0] for f in flat.values() for p in f})
    out = []
    for coll, leaves in flat.items():
        for path, leaf in leaves.items():
            module, leafname = path.rsplit("/", 1)
            tmod = module_fn(module)
            if tmod is None or leafname not in _LEAF:
                raise ValueError(f"{name}: no torchvision name for fdl {coll} leaf {path!r}")
            shape = tuple(np.shape(leaf))
            if leafname == "w":
                kind = "conv" if len(shape) == 4 else "dense"
                if kind == "dense" and fam in _FC1_KEY and tmod == _FC1_KEY[fam]:
                    kind = "dense_chw"
                elif kind == "dense" and fam == "mobilenet_v3" and ".block." in tmod:
                    kind = "conv1x1"  # squeeze-excite fc1/fc2: torch 1x1 convs
            else:
                kind = "vector"
            out.append((coll, path, f"{tmod}.{_LEAF[leafname]}", kind, shape))
    return out


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "conv":
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if kind == "conv1x1":
        return (shape[1], shape[0], 1, 1)
    if kind in ("dense", "dense_chw"):
        return (shape[1], shape[0])
    return shape


def _from_torch(kind: str, a: np.ndarray, fam: str) -> np.ndarray:
    if kind == "conv":
        return a.transpose(2, 3, 1, 0)
    if kind == "conv1x1":
        return a.reshape(a.shape[0], a.shape[1]).T
    if kind == "dense":
        return a.T
    if kind == "dense_chw":
        c, h, w = _FC1_CHW[fam]
        return a.reshape(a.shape[0], c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
    return a


def _to_torch(kind: str, a: np.ndarray, fam: str) -> np.ndarray:
    if kind == "conv":
        return a.transpose(3, 2, 0, 1)
    if kind == "conv1x1":
        return a.T.reshape(a.shape[1], a.shape[0], 1, 1)
    if kind == "dense":
        return a.T
    if kind == "dense_chw":
        c, h, w = _FC1_CHW[fam]
        return a.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(a.shape[1], -1)
    return a


def _template(model: Layer):
    shapes = jax.eval_shape(lambda k: model.init_params(k, (1, 224, 224, 3)),
                            jax.random.key(0))
    return shapes


def torchvision_key_map(name: str, model: Layer | None = None) -> dict[str, str]:
    """``{"params/features/conv1/w": "conv1.weight", "state/...": ...}`` for ``name``."""
    model = model or torchvision_model(name)
    params, state = _template(model)
    return {f"{c}/{p}": k for c, p, k, _, _ in _entries(name, params, state)}


def _infer_kwargs(name: str, sd: Mapping[str, np.ndarray]) -> dict[str, int]:
    fam = _family(name)
    kw = {}
    head = sd.get(_HEAD_KEY[fam] + ".weight")
    if head is not None and np.ndim(head) == 2:
        kw["num_classes"] = int(np.shape(head)[0])
    if fam in _FC1_KEY:
        fc1 = sd.get(_FC1_KEY[fam] + ".weight")
        if fc1 is not None and np.ndim(fc1) == 2:
            kw["fc_features"] = int(np.shape(fc1)[0])
    return kw


def from_torchvision(
    name: str,
    source: Mapping[str, Any] | str | os.PathLike,
    *,
    model: Layer | None = None,
    dtype=jnp.float32,
) -> tuple[Layer, dict, dict]:
    """Convert a torchvision state dict (a mapping, or a ``.safetensors`` / ``.npz`` / ``.pt``
    file) for model ``name`` into ``(model, params, state)``.

    Without ``model``, the fdl model is built with ``num_classes`` (and, for VGG/AlexNet, the
    hidden fc width) read from the state dict. Raises :class:`StateDictError` listing every
    missing, unexpected and mis-shaped key.
    """
    fam = _family(name)
    sd = load_state_dict(source)
    if model is None:
        model = torchvision_model(name, **_infer_kwargs(name, sd))
    params_t, state_t = _template(model)
    missing, mismatched, used = [], [], set()
    flat = {"params": {}, "state": {}}
    for coll, path, tkey, kind, shape in _entries(name, params_t, state_t):
        if tkey not in sd:
            missing.append(tkey)
            continue
        used.add(tkey)
        a = np.asarray(sd[tkey])
        want = _torch_shape(kind, shape)
        if tuple(a.shape) != want:
            mismatched.append(f"{tkey}: expected {want}, got {tuple(a.shape)}")
            continue
        flat[coll][path] = jnp.asarray(_from_torch(kind, a, fam), dtype)
    ignored = _IGNORED.get(fam, ())
    unexpected = [k for k in sd if k not in used and not k.endswith(".num_batches_tracked")
                  and not k.startswith(ignored)]
    bn_modules = {k.rsplit(".", 1)[0] for k in used if k.endswith(".running_mean")}
    unexpected += [k for k in sd if k.endswith(".num_batches_tracked")
                   and k.rsplit(".", 1)[0] not in bn_modules and not k.startswith(ignored)]
    if missing or mismatched or unexpected:
        raise StateDictError(f"torchvision {name} (fdl model {model.name})", missing,
                             unexpected, mismatched)
    return model, unflatten_dict(flat["params"]), unflatten_dict(flat["state"])


def to_torchvision(name: str, params: Mapping, state: Mapping) -> dict[str, np.ndarray]:
    """Export fdl ``params``/``state`` of model ``name`` as a torchvision state dict of numpy
    arrays (float32 conv/linear/BN tensors, int64 ``num_batches_tracked`` = 0)."""
    fam = _family(name)
    sd: dict[str, np.ndarray] = {}
    flat = {"params": flatten_dict(params), "state": flatten_dict(state)}
    for coll, path, tkey, kind, _ in _entries(name, params, state):
        sd[tkey] = np.ascontiguousarray(_to_torch(kind, np.asarray(flat[coll][path]), fam))
        if tkey.endswith(".running_var"):
            sd[tkey[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return sd
