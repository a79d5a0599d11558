"""The ``fdl`` command: ``fdl train``, ``fdl eval``, ``fdl predict``, ``fdl list``.

``fdl train`` with no arguments trains a small CNN on scikit-learn's digits (offline) and
writes a checkpoint, a JSON-lines log and the training-curve PNG under ``runs/cnn_digits/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# ----------------------------------------------------------------------------- registries


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: Callable[[int, tuple[int, ...]], Any]  # (num_classes, (H, W, C)) -> Layer
    help: str
    min_size: int = 1


def _cnn(num_classes, shape):
    from fdl import nn

    return nn.serial(
        ("conv1", nn.conv2d(32, 3, padding=1, use_bias=False)), ("bn1", nn.batch_norm()),
        ("act1", nn.relu()), ("pool1", nn.max_pool2d(2)),
        ("conv2", nn.conv2d(64, 3, padding=1, use_bias=False)), ("bn2", nn.batch_norm()),
        ("act2", nn.relu()), ("pool2", nn.max_pool2d(2)),
        ("flatten", nn.flatten()),
        ("fc1", nn.dense(128)), ("act3", nn.relu()), ("dropout", nn.dropout(0.25)),
        ("fc2", nn.dense(num_classes)),
    )


def _mlp(num_classes, shape):
    from fdl import nn

    return nn.serial(("flatten", nn.flatten()), ("fc1", nn.dense(256)), ("act", nn.relu()),
                     ("dropout", nn.dropout(0.2)), ("fc2", nn.dense(num_classes)))


def _softmax(num_classes, shape):
    from fdl import nn

    return nn.serial(("flatten", nn.flatten()), ("fc", nn.dense(num_classes)))


def _lenet(bn):
    def build(num_classes, shape):
        from fdl.models.vision import lenet5

        return lenet5(num_classes, shape[-1], batch_norm=bn)

    return build


def _resnet18(num_classes, shape):
    from fdl.models.vision import resnet18

    return resnet18(num_classes=num_classes, small_input=True, in_channels=shape[-1])


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(_cnn, "2 conv+BatchNorm+max-pool blocks, dense 128, dropout (default)", 4),
    "mlp": ModelSpec(_mlp, "one hidden layer of 256 ReLUs with dropout 0.2 (d2l 5.2)"),
    "softmax": ModelSpec(_softmax, "softmax regression (d2l 4.4)"),
    "lenet": ModelSpec(_lenet(False), "LeNet-5, sigmoid + average pooling (d2l 7.6)", 12),
    "lenet_bn": ModelSpec(_lenet(True), "LeNet-5 with BatchNorm (d2l 8.5)", 12),
    "resnet18": ModelSpec(_resnet18, "CIFAR-style ResNet-18 (d2l 8.6)", 8),
}

DATASETS: dict[str, str] = {
    "digits": "UCI handwritten digits from scikit-learn, 8x8x1, 10 classes, offline (default)",
    "mnist": "MNIST IDX files, 28x28x1 (looked up in --data-dir, downloaded if possible)",
    "fashion_mnist": "Fashion-MNIST IDX files, 28x28x1",
    "cifar10": "CIFAR-10 binary batches, 32x32x3",
    "<directory>": "an image folder: one sub-folder per class (use --image-size)",
}

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "nesterov", "rmsprop")


class CLIError(Exception):
    """A user error: printed as ``fdl: error: ...`` with exit status 2."""


def _listing() -> str:
    lines = ["models:"]
    lines += [f"  {n:<14}{m.help}" for n, m in MODELS.items()]
    lines.append("datasets (--data):")
    lines += [f"  {n:<14}{h}" for n, h in DATASETS.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data


def load_dataset(name: str, data_dir: str | None, image_size: int | None, seed: int = 0):
    """``((x_train, y_train), (x_test, y_test), num_classes)`` for a dataset name or folder."""
    from fdl import data as D

    if name == "digits":
        tr, te = D.load_digits(seed=seed)
        return tr, te, 10
    if name in ("mnist", "fashion_mnist"):
        d = os.path.join(data_dir, name) if data_dir else None
        tr, te = D.load_mnist(d, kind=name)
        return tr, te, 10
    if name == "cifar10":
        d = os.path.join(data_dir, "cifar10") if data_dir else None
        tr, te = D.load_cifar10(d)
        return tr, te, 10
    if os.path.isdir(name):
        x, y, classes = D.load_image_folder(name, size=image_size)
        tr, te = D.train_test_split(x, y, 0.2, seed)
        return tr, te, len(classes)
    raise CLIError(
        f"unknown dataset {name!r}; valid: {', '.join(n for n in DATASETS if n[0] != '<')} "
        "or a directory with one sub-folder per class"
    )


def _build_model(name: str, num_classes: int, shape: tuple[int, ...]):
    if name not in MODELS:
        raise CLIError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    spec = MODELS[name]
    if min(shape[0], shape[1]) < spec.min_size:
        raise CLIError(
            f"model {name!r} needs images of at least {spec.min_size}x{spec.min_size}; this "
            f"dataset has {shape[0]}x{shape[1]} (try --data mnist, or model cnn/mlp/softmax)"
        )
    return spec.build(num_classes, shape)


def _optimizer(name: str, lr: float, weight_decay: float):
    from fdl import optim

    if name not in OPTIMIZERS:
        raise CLIError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if name == "adam":
        return optim.adam(lr) if not weight_decay else optim.chain(
            optim.add_decayed_weights(weight_decay), optim.adam(lr))
    if name == "adamw":
        return optim.adamw(lr, weight_decay=weight_decay or 1e-2)
    if name == "sgd":
        return optim.sgd(lr, weight_decay=weight_decay)
    if name == "momentum":
        return optim.sgd(lr, momentum=0.9, weight_decay=weight_decay)
    if name == "nesterov":
        return optim.sgd(lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    return optim.rmsprop(lr, weight_decay=weight_decay)


# ----------------------------------------------------------------------------- commands


def _run_dir(args) -> str:
    data = os.path.basename(os.path.normpath(args.data))
    return os.path.join(args.output, f"{args.model}_{data}")


def cmd_train(args) -> int:
    t_start = time.perf_counter()
    if args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1, got {args.epochs}")
    if not args.lr > 0:
        raise CLIError(f"--lr must be > 0, got {args.lr}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.model not in MODELS:
        raise CLIError(f"unknown model {args.model!r}; valid: {', '.join(MODELS)}")
    import jax

    from fdl.data import ArrayLoader
    from fdl.train import fit

    (xtr, ytr), (xte, yte), num_classes = load_dataset(
        args.data, args.data_dir, args.image_size, args.seed)
    if args.batch_size > len(xtr):
        raise CLIError(
            f"--batch-size {args.batch_size} is larger than the training set ({len(xtr)} "
            f"examples of {args.data}); use at most {len(xtr)}"
        )
    shape = tuple(xtr.shape[1:])
    model = _build_model(args.model, num_classes, shape)
    opt = _optimizer(args.optimizer, args.lr, args.weight_decay)
    key = jax.random.key(args.seed)
    _, params, state = model.init(jax.random.fold_in(key, 1), (1, *shape))

    run_dir = _run_dir(args)
    ckpt_dir = args.checkpoint_dir or os.path.join(run_dir, "checkpoints")
    os.makedirs(run_dir, exist_ok=True)
    n_dev = args.devices or 1
    train_step = eval_step = None
    put: Any = True
    if n_dev > 1:
        from fdl import parallel

        if jax.local_device_count() < n_dev:
            raise CLIError(f"--devices {n_dev}: only {jax.local_device_count()} local devices")
        if args.batch_size % n_dev:
            raise CLIError(f"--batch-size {args.batch_size} must be a multiple of --devices "
                           f"{n_dev}")
        mesh = parallel.data_mesh(n_dev)
        train_step = parallel.make_sharded_train_step(model, opt, mesh=mesh)
        eval_step = parallel.make_sharded_eval_step(model, mesh=mesh)
        put = parallel.batch_sharding(mesh)
    train = ArrayLoader((xtr, ytr), args.batch_size, key=jax.random.fold_in(key, 2),
                        last_batch="pad", device_put=put)
    test_bs = min(256, len(xte))
    test_bs -= test_bs % n_dev
    test = ArrayLoader((xte, yte), test_bs, last_batch="pad", device_put=put)
    print(f"fdl train: model {args.model} ({sum(x.size for x in jax.tree.leaves(params)):,} "
          f"params), data {args.data} ({len(xtr)} train / {len(xte)} test, {shape}), "
          f"{args.optimizer} lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs, "
          f"{n_dev} device(s)")
    hint = " ".join(shlex.quote(a) for a in ["fdl", *sys.argv[1:]])
    if "--resume" not in sys.argv[1:]:
        hint += " --resume"
    meta = {"model": args.model, "data": args.data, "data_dir": args.data_dir,
            "image_size": args.image_size, "num_classes": num_classes, "input_shape": shape,
            "seed": args.seed}
    curve = os.path.join(run_dir, "curve.png")
    result = fit(
        model, params, state, opt, train, epochs=args.epochs, key=jax.random.fold_in(key, 3),
        eval_data=test, train_step=train_step, eval_step=eval_step,
        progress=not args.no_progress, log_file=os.path.join(run_dir, "log.jsonl"),
        plot=curve, checkpoint_dir=ckpt_dir, resume=args.resume, metadata=meta,
        resume_hint=hint, log_every=10,
    )
    last = result.history.last
    wall = time.perf_counter() - t_start
    acc, tloss = last.get("test_acc", float("nan")), last.get("test_loss", float("nan"))
    print(f"done: test accuracy {acc:.4f}, test loss {tloss:.4f} "
          f"after {len(result.history)} epochs in {wall:.1f} s wall time")
    print(f"checkpoint: {result.checkpoint}\ncurve:      {curve}\n"
          f"log:        {os.path.join(run_dir, 'log.jsonl')}")
    print(f"evaluate:   fdl eval {result.checkpoint}")
    return 0


def _restore(path: str):
    import jax

    from fdl.train import checkpoint as ckpt

    if os.path.isdir(path):
        found = ckpt.latest(path) or ckpt.latest(os.path.join(path, "checkpoints"))
        if found is None:
            raise CLIError(f"no checkpoint (ckpt_<step>.safetensors) in '{path}'")
        path = found
    if not os.path.exists(path):
        raise CLIError(f"checkpoint '{path}' does not exist")
    meta = ckpt.load_metadata(path)
    if "model" not in meta:
        raise CLIError(f"'{path}' was not written by 'fdl train' (no model name in metadata)")
    shape = tuple(meta["input_shape"])
    model = _build_model(meta["model"], meta["num_classes"], shape)
    _, params, state = model.init(jax.random.key(0), (1, *shape))
    tree = ckpt.load(path, {"params": params, "state": state}, partial=True)
    return path, meta, model, tree["params"], tree["state"]


def cmd_eval(args) -> int:
    from fdl.train import evaluate, make_eval_step

    path, meta, model, params, state = _restore(args.checkpoint)
    data = args.data or meta["data"]
    _, (xte, yte), _ = load_dataset(data, args.data_dir or meta.get("data_dir"),
                                    meta.get("image_size"), meta.get("seed", 0))
    res = evaluate(params, state, (xte, yte), eval_step=make_eval_step(model, top_k=(3,)))
    print(f"{path}: {meta['model']} on {data} test set ({len(xte)} examples): "
          f"accuracy {res['acc']:.4f}, top-3 {res['top3_acc']:.4f}, loss {res['loss']:.4f}")
    return 0


def cmd_predict(args) -> int:
    import jax
    import numpy as np

    from fdl.train import make_predict_fn

    path, meta, model, params, state = _restore(args.checkpoint)
    shape = tuple(meta["input_shape"])
    if args.images:
        from PIL import Image

        xs = []
        for p in args.images:
            if not os.path.exists(p):
                raise CLIError(f"image '{p}' does not exist")
            with Image.open(p) as im:
                im = im.convert("L" if shape[-1] == 1 else "RGB").resize((shape[1], shape[0]))
                a = np.asarray(im, np.float32) / 255.0
            xs.append(a.reshape(shape))
        x, labels, names = np.stack(xs), None, args.images
    else:
        data = args.data or meta["data"]
        _, (xte, yte), _ = load_dataset(data, args.data_dir or meta.get("data_dir"),
                                        meta.get("image_size"), meta.get("seed", 0))
        x, labels = xte[: args.count], yte[: args.count]
        names = [f"{data} test #{i}" for i in range(len(x))]
    probs = np.asarray(jax.nn.softmax(make_predict_fn(model)(params, state, x), axis=-1))
    for i, name in enumerate(names):
        c = int(probs[i].argmax())
        extra = "" if labels is None else f"  (label {int(labels[i])})"
        print(f"{name}: class {c}  p={probs[i, c]:.3f}{extra}")
    return 0


def cmd_list(args) -> int:
    print(_listing())
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="fdl", formatter_class=fmt,
        description="fdl: a functional deep-learning library on JAX.\n\n" + _listing(),
        epilog="Run 'fdl train' to train the default CNN on the offline digits set.",
    )
    sub = p.add_subparsers(dest="command", metavar="{train,eval,predict,list}")
    t = sub.add_parser("train", help="train a model", formatter_class=fmt,
                       description="Train a model and write a checkpoint, a JSON-lines log and "
                                   "a training-curve PNG.\n\n" + _listing())
    t.add_argument("model", nargs="?", default="cnn", help="model name (default: cnn)")
    t.add_argument("--data", default="digits", help="dataset name or image folder (digits)")
    t.add_argument("--data-dir", default=None, help="where dataset files are (default "
                   "$FDL_DATA or ~/.cache/fdl/data)")
    t.add_argument("--image-size", type=int, default=None, help="resize image-folder images")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--optimizer", default="adam", help=f"one of {', '.join(OPTIMIZERS)}")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--devices", type=int, default=1,
                   help="data-parallel over this many local devices (sharded jit)")
    t.add_argument("--output", default="runs", help="run directory root (default runs/)")
    t.add_argument("--checkpoint-dir", default=None,
                   help="default <output>/<model>_<data>/checkpoints")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint on its test set")
    e.add_argument("checkpoint", help="checkpoint file or run / checkpoint directory")
    e.add_argument("--data", default=None)
    e.add_argument("--data-dir", default=None)
    e.set_defaults(func=cmd_eval)
    pr = sub.add_parser("predict", help="predict classes with a checkpoint")
    pr.add_argument("checkpoint")
    pr.add_argument("images", nargs="*", help="image files (default: test-set examples)")
    pr.add_argument("--data", default=None)
    pr.add_argument("--data-dir", default=None)
    pr.add_argument("--count", type=int, default=10)
    pr.set_defaults(func=cmd_predict)
    ls = sub.add_parser("list", help="list models and datasets")
    ls.set_defaults(func=cmd_list)
    return p


def _force_cpu_devices(n: int) -> None:
    """Let ``--devices n`` work on a CPU-only machine (before JAX initialises)."""
    if n > 1 and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "train":
        _force_cpu_devices(args.devices)
    from fdl.data.datasets import DatasetNotFoundError
    from fdl.train.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CLIError, DatasetNotFoundError, CheckpointError, ValueError, ImportError) as e:
        print(f"fdl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
