"""The ``fdl`` command: ``fdl train``, ``fdl eval``, ``fdl predict``, ``fdl list``.

``fdl train`` with no arguments trains a small CNN on scikit-learn's digits (offline). Every run
gets a folder of its own, ``runs/cnn_digits/<start time>/`` (``runs/cnn_digits/latest`` points at
the newest; see :mod:`fdl.runs`), holding its checkpoints, JSON-lines log, training-curve PNG
and config; ``--resume`` continues a run, ``--overwrite`` replaces the latest one. ``fdl eval``
and ``fdl predict`` take a model folder, a run folder or a checkpoint, and use the newest
checkpoint that verifies (saying which, and warning about any they skip).

Arguments are checked before JAX is imported, so a bad one is reported at once; file-system
errors are one line naming the path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import tempfile
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


def dataset_dir(name: str, data_dir: str | None) -> str | None:
    """The folder holding ``name``'s files: ``--data-dir`` itself (or its ``<name>/``
    sub-folder, if it has one), else ``None`` (the loaders' default, ``$FDL_DATA/<name>`` or
    ``~/.cache/fdl/data/<name>``)."""
    if not data_dir:
        return None
    data_dir = os.path.expanduser(data_dir)
    sub = os.path.join(data_dir, name)
    return sub if os.path.isdir(sub) else data_dir


def load_dataset(name: str, data_dir: str | None, image_size: int | None, seed: int = 0):
    """``((x_train, y_train), (x_test, y_test), num_classes)`` for a dataset name or folder."""
    if name not in DATASETS and not os.path.isdir(name):
        what = "is a file" if os.path.isfile(name) else "is not a known dataset"
        raise CLIError(
            f"--data {name!r} {what}; valid: {', '.join(n for n in DATASETS if n[0] != '<')} "
            "or a directory with one sub-folder per class"
        )
    from fdl import data as D

    if name == "digits":
        tr, te = D.load_digits(seed=seed)
        return tr, te, 10
    if name in ("mnist", "fashion_mnist"):
        tr, te = D.load_mnist(dataset_dir(name, data_dir), kind=name)
        return tr, te, 10
    if name == "cifar10":
        tr, te = D.load_cifar10(dataset_dir(name, data_dir))
        return tr, te, 10
    x, y, classes = D.load_image_folder(name, size=image_size)
    if len(x) < 2:
        raise CLIError(f"image folder '{name}' has {len(x)} image(s); need at least 2 to split "
                       "into training and test sets")
    tr, te = D.train_test_split(x, y, 0.2, seed)
    return tr, te, len(classes)


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


# ----------------------------------------------------------------------------- checks


# fdl.data.augment.SPEC_NAMES, repeated here so that arguments are checked without JAX (a test
# keeps the two equal)
AUGMENTATIONS = ("flip", "vflip", "crop", "cutout", "jitter")


def _check_train_args(args) -> None:
    """Every check that needs no data and no JAX (so errors come at once)."""
    if args.model not in MODELS:
        raise CLIError(f"unknown model {args.model!r}; valid: {', '.join(MODELS)}")
    if args.optimizer not in OPTIMIZERS:
        raise CLIError(f"unknown optimizer {args.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1, got {args.epochs}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise CLIError(f"--lr must be > 0 (and finite), got {args.lr}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise CLIError(f"--weight-decay must be >= 0 (and finite), got {args.weight_decay}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.devices < 1:
        raise CLIError(f"--devices must be >= 1, got {args.devices}")
    if args.num_processes < 1:
        raise CLIError(f"--num-processes must be >= 1, got {args.num_processes}")
    total = args.devices * args.num_processes
    if total > args.batch_size or args.batch_size % total:
        what = (f"--devices {args.devices}" if args.num_processes == 1 else
                f"the {total} devices (--num-processes {args.num_processes} x --devices "
                f"{args.devices})")
        raise CLIError(f"--batch-size {args.batch_size} must be a multiple of {what} (each "
                       "device gets an equal share)")
    for flag, value in (("--heartbeat-timeout", args.heartbeat_timeout),
                        ("--init-timeout", args.init_timeout)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be >= 1 second, got {value}")
    if args.image_size is not None and args.image_size < 1:
        raise CLIError(f"--image-size must be >= 1, got {args.image_size}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if args.resume is not None and args.overwrite:
        raise CLIError("--resume and --overwrite contradict each other; pass one")
    if args.augment is not None:
        names = [n.strip().lower() for n in args.augment.split(",") if n.strip()]
        bad = [n for n in names if n not in AUGMENTATIONS]
        if not names or bad:
            raise CLIError(f"--augment {args.augment!r}: " + (f"unknown {bad}; " if bad else "")
                           + f"give a comma-separated list of {', '.join(AUGMENTATIONS)}")
    for flag, path in (("--output", args.output), ("--checkpoint-dir", args.checkpoint_dir)):
        if path:
            _check_dir_target(flag, path)


def _check_dir_target(flag: str, path: str) -> None:
    """``path`` must be a directory or creatable as one (no regular file on the way)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if not os.path.isdir(p):
        raise CLIError(f"{flag} '{path}': '{p}' is a file, not a directory")
    try:  # a real probe (permissions, read-only file systems, root included), then gone
        os.rmdir(tempfile.mkdtemp(prefix=".fdl-probe-", dir=p))
    except OSError as e:
        raise CLIError(f"{flag} '{path}': cannot create folders in '{p}' "
                       f"({e.strerror or e})") from None


def _model_dir(args) -> str:
    data = os.path.basename(os.path.normpath(args.data))
    return os.path.join(os.path.expanduser(args.output), f"{args.model}_{data}")


# ----------------------------------------------------------------------------- runs


def _say_skipped(path: str, reason: str) -> None:
    print(f"fdl: warning: {reason}; skipped it", file=sys.stderr)


def _newest_checkpoint(ckpt_dir: str) -> str | None:
    """The newest checkpoint in ``ckpt_dir`` that verifies (warning about newer ones)."""
    from fdl.train import checkpoint as ckpt

    return ckpt.latest_valid(ckpt_dir, _say_skipped)


def _checkpoint_for(path: str) -> tuple[str, str]:
    """``(run folder, verified checkpoint)`` for a model folder, run folder or file."""
    from fdl import runs
    from fdl.train import checkpoint as ckpt

    try:
        run_dir, target = runs.resolve_run(os.path.expanduser(path))
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    if os.path.isfile(target):
        ckpt.verify(target)
        return run_dir, target
    found = _newest_checkpoint(target)
    if found is None:
        raise CLIError(f"no intact checkpoint (ckpt_<step>.safetensors) in '{target}'")
    return run_dir, found


def _prepare_run(args) -> tuple[str, str | None]:
    """``(run folder, checkpoint to resume or None)``, creating the folder for a new run; a
    run never writes into another run's folder unless ``--overwrite``."""
    from fdl import runs

    model_dir = _model_dir(args)
    fixed = os.path.expanduser(args.checkpoint_dir) if args.checkpoint_dir else None
    if args.resume is not None:
        where = args.resume or fixed or model_dir
        try:
            run_dir, target = runs.resolve_run(where)
        except FileNotFoundError:
            run_dir, target = None, None
        path = None
        if target is not None:
            path = target if os.path.isfile(target) else _newest_checkpoint(target)
        if path is not None:
            return run_dir, path
        print(f"fdl train: nothing to resume in '{where}' (no intact checkpoint); starting a "
              "new run")
    try:
        if fixed is not None:
            existing = runs.run_files(fixed)
            if existing and not args.overwrite:
                raise CLIError(f"--checkpoint-dir '{fixed}' already holds a run "
                               f"({os.path.basename(existing[0])}, ...); pass --resume to "
                               "continue it or --overwrite to replace it")
            os.makedirs(fixed, exist_ok=True)
            runs.clear_run(fixed)
            return fixed, None
        if args.overwrite:
            run_dir = runs.latest_run(model_dir)
            if run_dir is not None:
                runs.clear_run(run_dir)
                return run_dir, None
        return runs.new_run(model_dir), None
    except OSError as e:
        raise CLIError(f"cannot create the run folder: {_os_message(e)}") from None


def _resumed_epoch(path: str) -> int:
    from fdl.train import checkpoint as ckpt

    tree = ckpt.load(path)
    loader = tree.get("loader", {}) if isinstance(tree, dict) else {}
    return int(loader.get("epoch", 0)) if not loader.get("batch", 0) else -1


def _write_config(run_dir: str, args, meta: dict) -> None:
    cfg = {"argv": ["fdl", *sys.argv[1:]], **{k: v for k, v in vars(args).items()
                                               if k != "func"}, **meta}
    tmp = os.path.join(run_dir, ".config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=1, default=str)
    os.replace(tmp, os.path.join(run_dir, "config.json"))


# ----------------------------------------------------------------------------- commands


def _join_run(args):
    """Join a multi-process run when this process is one (``--coordinator``, the variables
    ``fdl.launch`` sets, or SLURM); returns ``fdl.distributed.ProcessInfo``."""
    import fdl.distributed as dist

    try:
        spec = dist.detect_cluster(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes if args.coordinator else None,
            process_id=args.process_id if args.coordinator else None)
    except dist.ClusterConfigError as e:
        raise CLIError(str(e)) from None
    if spec is not None and args.num_processes > 1 and spec.num_processes != args.num_processes:
        raise CLIError(f"--num-processes {args.num_processes}, but this process was started as "
                       f"one of {spec.num_processes} (from {spec.source})")
    timeouts = dist.Timeouts.from_env(heartbeat=args.heartbeat_timeout, init=args.init_timeout)
    return dist.initialize(spec, timeouts=timeouts)


def _prepare_run_everywhere(args, main: bool) -> tuple[str, str | None]:
    """``_prepare_run`` in process 0 only; every process gets its result (or its error)."""
    from fdl.distributed import broadcast_text

    answer = None
    if main:
        try:
            answer = json.dumps({"run": _prepare_run(args)})
        except CLIError as e:
            answer = json.dumps({"error": str(e)})
    answer = json.loads(broadcast_text(answer))
    if "error" in answer:
        raise CLIError(answer["error"])
    return tuple(answer["run"])


def cmd_train(args) -> int:
    t_start = time.perf_counter()
    proc = _join_run(args)
    say = print if proc.is_main else (lambda *a, **k: None)
    (xtr, ytr), (xte, yte), num_classes = load_dataset(
        args.data, args.data_dir, args.image_size, args.seed)
    if args.batch_size > len(xtr):
        raise CLIError(
            f"--batch-size {args.batch_size} is larger than the training set ({len(xtr)} "
            f"examples of {args.data}); use at most {len(xtr)}"
        )
    shape = tuple(xtr.shape[1:])
    model = _build_model(args.model, num_classes, shape)
    if args.augment:
        from fdl.data import augment

        # training batches augmented on the device; eval/predict rebuild the plain model
        model = augment.augmented(model, augment.from_spec(args.augment))
    import jax

    n_dev = args.devices
    if jax.local_device_count() < n_dev:
        raise CLIError(f"--devices {n_dev}: only {jax.local_device_count()} local devices")
    if proc.count > 1 and args.batch_size % (n_dev * proc.count):
        raise CLIError(f"--batch-size {args.batch_size} must be a multiple of the "
                       f"{n_dev * proc.count} devices of the {proc.count} processes")
    run_dir, resume_from = _prepare_run_everywhere(args, proc.is_main)
    if resume_from is not None:
        done = _resumed_epoch(resume_from)
        if done >= args.epochs:
            say(f"fdl train: {run_dir} already finished {done} epoch(s) ({resume_from}); "
                f"nothing was trained. Pass --epochs N with N > {done} to train it further.")
            return 0
    meta = {"model": args.model, "data": args.data, "data_dir": args.data_dir,
            "image_size": args.image_size, "num_classes": num_classes, "input_shape": shape,
            "seed": args.seed}
    if resume_from is None and proc.is_main:
        _write_config(run_dir, args, meta)
    result = _fit(args, model, num_classes, shape, (xtr, ytr), (xte, yte), run_dir,
                  resume_from, meta, proc)
    last = result.history.last
    wall = time.perf_counter() - t_start
    acc, tloss = last.get("test_acc", float("nan")), last.get("test_loss", float("nan"))
    say(f"done: test accuracy {acc:.4f}, test loss {tloss:.4f} "
        f"after {len(result.history)} epochs in {wall:.1f} s wall time")
    say(f"run:        {run_dir}\ncheckpoint: {result.checkpoint}\n"
        f"curve:      {os.path.join(run_dir, 'curve.png')}\n"
        f"log:        {os.path.join(run_dir, 'log.jsonl')}")
    say(f"evaluate:   fdl eval {shlex.quote(run_dir)}")
    return 0


def _fit(args, model, num_classes, shape, train_set, test_set, run_dir, resume_from, meta,
         proc):
    """``fit`` on ``args.devices`` local devices, or on every device of a multi-process run
    (``proc``), where process 0 alone prints, logs, plots and writes the checkpoints."""
    import jax

    from fdl.data import ArrayLoader
    from fdl.train import PlotCurves, fit

    opt = _optimizer(args.optimizer, args.lr, args.weight_decay)
    key = jax.random.key(args.seed)
    _, params, state = model.init(jax.random.fold_in(key, 1), (1, *shape))
    n_dev = args.devices * proc.count
    train_step = eval_step = None
    put: Any = True
    if n_dev > 1:
        from fdl import parallel

        mesh = (parallel.data_mesh(per_process=args.devices) if proc.count > 1
                else parallel.data_mesh(n_dev))
        train_step = parallel.make_sharded_train_step(model, opt, mesh=mesh)
        eval_step = parallel.make_sharded_eval_step(model, mesh=mesh)
        put = parallel.batch_sharding(mesh)
        params, state = parallel.replicate_on_mesh((params, state), mesh)
    (xtr, ytr), (xte, yte) = train_set, test_set
    train = ArrayLoader((xtr, ytr), args.batch_size, key=jax.random.fold_in(key, 2),
                        last_batch="pad", device_put=put)
    test_bs = max(n_dev, min(256, len(xte)) // n_dev * n_dev)
    test = ArrayLoader((xte, yte), test_bs, last_batch="pad", device_put=put)
    where = f"{n_dev} device(s)" + (f" in {proc.count} processes" if proc.count > 1 else "")
    main = proc.is_main
    if main:
        print(f"fdl train: model {args.model} ({sum(x.size for x in jax.tree.leaves(params)):,} "
              f"params), data {args.data} ({len(xtr)} train / {len(xte)} test, {shape}), "
              f"{args.optimizer} lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs, "
              f"{where}\nrun folder: {run_dir}")
    hint = " ".join(shlex.quote(a) for a in ["fdl", *sys.argv[1:]]
                    if a not in ("--resume", "--overwrite"))
    hint += f" --resume {shlex.quote(run_dir)}"
    return fit(
        model, params, state, opt, train, epochs=args.epochs, key=jax.random.fold_in(key, 3),
        eval_data=test, train_step=train_step, eval_step=eval_step,
        progress=main and not args.no_progress, print_fn=print if main else None,
        log_file=os.path.join(run_dir, "log.jsonl") if main else None,
        callbacks=[PlotCurves(os.path.join(run_dir, "curve.png"),
                              title=f"{args.model} on {args.data}")] if main else [],
        checkpoint_dir=run_dir,
        resume=resume_from or False, metadata=meta, resume_hint=hint, log_every=10,
    )


def _restore(path: str):
    import jax

    from fdl.train import checkpoint as ckpt

    run_dir, path = _checkpoint_for(path)
    meta = ckpt.load_metadata(path)
    if "model" not in meta or "input_shape" not in meta or "num_classes" not in meta:
        raise CLIError(f"'{path}' was not written by 'fdl train' (no model name in metadata)")
    shape = tuple(meta["input_shape"])
    model = _build_model(meta["model"], meta["num_classes"], shape)
    _, params, state = model.init(jax.random.key(0), (1, *shape))
    template: dict[str, Any] = {"params": params, "state": state}
    if "fdl_fit" in meta:
        template["step"] = 0
    tree = ckpt.load(path, template, partial=True)
    print(f"run {run_dir}, checkpoint {os.path.basename(path)} (step {tree.get('step', '?')})")
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


def _read_images(paths: Sequence[str], shape: tuple[int, ...]):
    import numpy as np
    from PIL import Image

    xs = []
    for p in paths:
        if not os.path.isfile(p):
            raise CLIError(f"image '{p}' " + ("is a directory" if os.path.isdir(p)
                                              else "does not exist"))
        try:
            with Image.open(p) as im:
                im = im.convert("L" if shape[-1] == 1 else "RGB").resize((shape[1], shape[0]))
                a = np.asarray(im, np.float32) / 255.0
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise CLIError(f"cannot read image '{p}': {_os_message(e)}") from None
        xs.append(a.reshape(shape))
    return np.stack(xs)


def cmd_predict(args) -> int:
    import jax
    import numpy as np

    from fdl.train import make_predict_fn

    if args.count < 1:
        raise CLIError(f"--count must be >= 1, got {args.count}")
    path, meta, model, params, state = _restore(args.checkpoint)
    shape = tuple(meta["input_shape"])
    if args.images:
        x, labels, names = _read_images(args.images, shape), None, args.images
    else:
        data = args.data or meta["data"]
        _, (xte, yte), _ = load_dataset(data, args.data_dir or meta.get("data_dir"),
                                        meta.get("image_size"), meta.get("seed", 0))
        if tuple(xte.shape[1:]) != shape:
            raise CLIError(f"--data {data}: images of shape {tuple(xte.shape[1:])}, the model "
                           f"in '{path}' takes {shape}")
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
    from fdl.runtime import kernels_table

    print("kernels (fdl.kernels(): native oneDNN or XLA, and why):")
    print(kernels_table())
    return 0


# ----------------------------------------------------------------------------- parser


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the listing's line breaks and shows every option's default (unless its help
    already says what the default is, or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = _Formatter
    p = argparse.ArgumentParser(
        prog="fdl", formatter_class=fmt,
        description="fdl: a functional deep-learning library on JAX.\n\n" + _listing(),
        epilog="Run 'fdl train' to train the default CNN on the offline digits set.",
    )
    sub = p.add_subparsers(dest="command", metavar="{train,eval,predict,list}")
    t = sub.add_parser("train", help="train a model", formatter_class=fmt,
                       description="Train a model. Each run gets a folder of its own, "
                                   "<output>/<model>_<data>/<start time>/ (with 'latest' "
                                   "pointing at the newest), holding its checkpoints, "
                                   "log.jsonl, curve.png and config.json.\n\n" + _listing())
    t.add_argument("model", nargs="?", default="cnn", help="model name")
    t.add_argument("--data", default="digits", help="dataset name or image folder")
    t.add_argument("--data-dir", default=None,
                   help="the folder holding the dataset's files (default: $FDL_DATA/<data> or "
                        "~/.cache/fdl/data/<data>)")
    t.add_argument("--image-size", type=int, default=None,
                   help="resize image-folder images to this size (default: keep)")
    t.add_argument("--epochs", type=int, default=10, help="epochs to train (in total, with "
                                                          "--resume)")
    t.add_argument("--batch-size", type=int, default=64, help="training batch size")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    t.add_argument("--optimizer", default="adam", help=f"one of {', '.join(OPTIMIZERS)}")
    t.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay")
    t.add_argument("--devices", type=int, default=1,
                   help="data-parallel over this many local devices (sharded jit); with "
                        "--num-processes, per process")
    t.add_argument("--num-processes", type=int, default=1,
                   help="train as this many processes on jax.distributed: started here over "
                        "loopback, or with --coordinator one process of a cluster run "
                        "(docs/distributed.md)")
    t.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="join a multi-process run whose process 0 serves HOST:PORT (with "
                        "--num-processes and --process-id; SLURM and the FDL_* variables of "
                        "fdl.launch are read without it)")
    t.add_argument("--process-id", type=int, default=None, help="this process's id, "
                   "0..N-1, with --coordinator")
    t.add_argument("--heartbeat-timeout", type=int, default=None,
                   help="seconds without a heartbeat before a process counts as dead and the "
                        "run stops (default $FDL_HEARTBEAT_TIMEOUT or 30)")
    t.add_argument("--init-timeout", type=int, default=None,
                   help="seconds to wait for every process to connect (default "
                        "$FDL_INIT_TIMEOUT or 120)")
    t.add_argument("--output", default="runs", help="root of the model folders")
    t.add_argument("--checkpoint-dir", default=None,
                   help="use this folder as the run folder (checkpoints, log, curve, config) "
                        "instead of a new one under --output")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN",
                   help="continue a run from its newest intact checkpoint: RUN is a run "
                        "folder or checkpoint (default: the latest run of this model and data)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the latest run (or --checkpoint-dir's run) instead of "
                        "starting a new run folder")
    t.add_argument("--augment", default=None, metavar="LIST",
                   help="augment training images on the device: a comma-separated list of "
                        f"{', '.join(AUGMENTATIONS)} (e.g. flip,crop; crop pads by 1/8 of "
                        "the height)")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a run on its test set", formatter_class=fmt)
    e.add_argument("checkpoint", metavar="RUN",
                   help="model folder (its latest run), run folder or checkpoint file")
    e.add_argument("--data", default=None, help="dataset (default: the run's)")
    e.add_argument("--data-dir", default=None, help="the folder holding the dataset's files "
                                                    "(default: the run's)")
    e.set_defaults(func=cmd_eval)
    pr = sub.add_parser("predict", help="predict classes with a run's checkpoint",
                        formatter_class=fmt)
    pr.add_argument("checkpoint", metavar="RUN",
                    help="model folder (its latest run), run folder or checkpoint file")
    pr.add_argument("images", nargs="*", help="image files (default: test-set examples)")
    pr.add_argument("--data", default=None, help="dataset (default: the run's)")
    pr.add_argument("--data-dir", default=None, help="the folder holding the dataset's files "
                                                     "(default: the run's)")
    pr.add_argument("--count", type=int, default=10, help="test-set examples to predict")
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


def _os_message(e: BaseException) -> str:
    """One line for an ``OSError`` (or a Pillow error): the reason and the path."""
    if isinstance(e, OSError) and e.strerror:
        where = f" '{e.filename}'" if e.filename else ""
        return f"{e.strerror}:{where}" + (f" -> '{e.filename2}'" if e.filename2 else "")
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _user_errors() -> tuple[type[BaseException], ...]:
    from fdl.data.datasets import DatasetError
    from fdl.train.checkpoint import CheckpointError

    return (CLIError, DatasetError, CheckpointError, ValueError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "train":
            _check_train_args(args)  # before JAX is imported: errors come at once
            _force_cpu_devices(args.devices)
            if _launches_here(args):
                from fdl.launch import launch

                argv = list(sys.argv[1:] if argv is None else argv)
                return launch([sys.executable, "-m", "fdl.cli", *argv], args.num_processes,
                              cpu_devices=args.devices,
                              timeouts={"heartbeat": args.heartbeat_timeout,
                                        "init": args.init_timeout})
        from fdl.runtime import tune_allocator

        tune_allocator()  # process tuning for this command's process (see fdl.runtime)
        return _finish(args.func(args))
    except CLIError as e:
        print(f"fdl: error: {e}", file=sys.stderr)
        return _finish(2)
    except KeyboardInterrupt:
        return _finish(130)
    except OSError as e:
        print(f"fdl: error: {_os_message(e)}", file=sys.stderr)
        return _finish(2)
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"fdl: error: {e}", file=sys.stderr)
            return _finish(2)
        raise


def _launches_here(args) -> bool:
    """``fdl train --num-processes N`` on one machine: this process starts the N processes
    (it is not one of them, and no cluster or coordinator says otherwise)."""
    from fdl.distributed import detect_cluster

    return (args.num_processes > 1 and args.coordinator is None
            and detect_cluster() is None)


def _finish(code: int) -> int:
    """``code``; in a multi-process run a failing process ends at once (no exit handshake,
    which would wait for the others while they wait for it; see fdl.distributed)."""
    if code and "fdl.distributed" in sys.modules:
        from fdl.distributed import exit_now, joined

        if joined():
            exit_now(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
