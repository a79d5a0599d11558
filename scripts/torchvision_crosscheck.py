"""fdl's torchvision-layout models against the *real* torchvision classes, in a separate venv.

torchvision from PyPI cannot be installed beside the test suite's torch 2.13.0+cpu (its C++ ops
link against the CUDA torch: importing it fails with "operator torchvision::nms does not
exist"), so the tests compare with hand-built references (tests/interop/torchvision_reference.py).
This script closes the gap once, outside the test suite: for each model in
``fdl.interop.torchvision.SUPPORTED`` it initialises the fdl model (10 classes, BatchNorm
statistics randomised), exports it with ``to_torchvision``, and a second Python -- a throwaway
venv with ``torch==2.13.0`` and ``torchvision==0.28.0 --no-deps`` -- loads that state dict into
``torchvision.models.<name>(num_classes=10)`` with ``strict=True`` and compares eval-mode logits
on the same input. The model classes are pure Python; only torchvision's C++ ops fail to load,
so the worker stubs ``torchvision._meta_registrations`` (the classification models use no op).

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.13.0 pillow numpy && \\
        /tmp/tv/bin/pip install --no-deps torchvision==0.28.0
    python -m scripts.torchvision_crosscheck --tv-python /tmp/tv/bin/python [--models a,b]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

_WORKER = r"""
import sys, types
sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")
import numpy as np, torch, torchvision
from torchvision import models
name, path = sys.argv[1], sys.argv[2]
data = np.load(path)
kw = {"num_classes": 10}
if name == "googlenet":
    kw.update(aux_logits=False, init_weights=True)
m = getattr(models, name)(**kw).eval()
sd = {k[3:]: torch.from_numpy(data[k]) for k in data.files if k.startswith("sd/")}
m.load_state_dict(sd, strict=True)
with torch.no_grad():
    y = m(torch.from_numpy(data["x"])).numpy()
want = data["y"]
rel = np.linalg.norm(y - want) / np.linalg.norm(y)
print(f"{name}: torchvision {torchvision.__version__} strict load ok, logits rel. diff "
      f"{rel:.2e}, max abs diff {np.abs(y - want).max():.2e}")
"""


def _export(name: str, size: int, path: str) -> None:
    import jax
    import jax.numpy as jnp

    from fdl.interop.torchvision import to_torchvision, torchvision_model

    model = torchvision_model(name, 10)
    params, state = jax.jit(model.init_params, static_argnums=1)(jax.random.key(0),
                                                                 (1, size, size, 3))
    rng = np.random.default_rng(0)
    state = jax.tree_util.tree_map_with_path(  # running means N(0, 0.1), variances U(0.5, 1.5)
        lambda p, a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape) if p[-1].key == "var"
                                 else 0.1 * rng.normal(size=a.shape), a.dtype), state)
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    y, _ = jax.jit(model.apply)(params, state, jnp.asarray(x))
    sd = to_torchvision(name, params, state)
    np.savez(path, x=x.transpose(0, 3, 1, 2), y=np.asarray(y),
             **{f"sd/{k}": v for k, v in sd.items()})


def main(argv=None) -> None:
    from fdl.interop.torchvision import SUPPORTED

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tv-python", required=True, help="python of a venv with torchvision")
    ap.add_argument("--models", default=",".join(SUPPORTED))
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = os.path.join(tmp, f"{name}.npz")
            _export(name, args.size, path)
            r = subprocess.run([args.tv_python, "-c", _WORKER, name, path],
                               capture_output=True, text=True)
            os.remove(path)
            out = (r.stdout.strip() or r.stderr.strip().splitlines()[-1])
            print(out, flush=True)
            if r.returncode != 0:
                failed.append(name)
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()
