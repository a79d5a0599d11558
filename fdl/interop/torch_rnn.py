"""Weight conversion between ``torch.nn.RNN`` / ``GRU`` / ``LSTM`` state dicts and
:mod:`fdl.nn.recurrent` params.

PyTorch stores, per layer ``k`` and direction (suffix ``_reverse`` for the backward one),
``weight_ih_l{k}`` (G*H, in), ``weight_hh_l{k}`` (G*H, H), ``bias_ih_l{k}`` and ``bias_hh_l{k}``
(G*H,), and with an LSTM projection (``proj_size`` P) ``weight_hr_l{k}`` (P, H), which makes
``weight_hh_l{k}`` (G*H, P). fdl stores ``params[f"l{k}"]["fwd"|"bwd"]`` = ``{"w_ih": (in, G*H),
"w_hh": (H or P, G*H), "b_ih", "b_hh"[, "w_hr": (H, P)]}``: the weights are **transposed**
(fdl's dense layout is ``(in, out)``) and the gate blocks keep **PyTorch's order** -- LSTM
``[i, f, g, o]``, GRU ``[r, z, n]`` -- so no gate reordering is needed either way. (Other
libraries differ: Keras LSTM is ``[i, f, c, o]`` with a single bias, Flax's
``OptimizedLSTMCell`` keeps separate per-gate kernels; convert those to PyTorch's order
first.) PyTorch layers built with ``bias=False`` are converted with zero biases.

Values may be numpy arrays or torch tensors (converted with ``.detach().cpu().numpy()``);
torch itself is never imported here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["rnn_params_from_torch", "rnn_params_to_torch"]

_KEY = re.compile(r"^(weight_(?:ih|hh|hr)|bias_(?:ih|hh))_l(\d+)(_reverse)?$")


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def rnn_params_from_torch(state_dict: Mapping[str, Any], dtype=np.float32) -> dict:
    """``torch.nn.RNN/GRU/LSTM(...).state_dict()`` -> fdl params (numpy arrays of ``dtype``).

    Accepts an optional module prefix (``"rnn.weight_ih_l0"``): everything up to the last
    ``.`` is ignored. Raises ``ValueError`` on unknown keys or a missing weight.
    """
    params: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for full_key, value in state_dict.items():
        name = full_key.rsplit(".", 1)[-1]
        m = _KEY.match(name)
        if m is None:
            raise ValueError(f"rnn_params_from_torch: unexpected key {full_key!r} (expected "
                             "weight_ih/weight_hh/weight_hr/bias_ih/bias_hh_l<k>[_reverse])")
        what, layer, rev = m.groups()
        d = params.setdefault(f"l{int(layer)}", {}).setdefault("bwd" if rev else "fwd", {})
        arr = _to_numpy(value).astype(dtype)
        kind, which = what.split("_")
        d[f"{'w' if kind == 'weight' else 'b'}_{which}"] = arr.T if kind == "weight" else arr
    if not params:
        raise ValueError("rnn_params_from_torch: empty state dict")
    for lname, layer in params.items():
        for dname, d in layer.items():
            for w in ("w_ih", "w_hh"):
                if w not in d:
                    raise ValueError(f"rnn_params_from_torch: {lname}/{dname} lacks {w}")
            g_h = d["w_hh"].shape[1]
            for b in ("b_ih", "b_hh"):
                d.setdefault(b, np.zeros((g_h,), dtype))
    return dict(sorted(params.items(), key=lambda kv: int(kv[0][1:])))


def rnn_params_to_torch(params: Mapping[str, Any], dtype=np.float32) -> dict[str, np.ndarray]:
    """fdl recurrent params -> a PyTorch-style state dict of numpy arrays (load it with
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``)."""
    out: dict[str, np.ndarray] = {}
    for lname, layer in params.items():
        k = int(lname[1:])
        for dname, d in layer.items():
            suffix = "_reverse" if dname == "bwd" else ""
            out[f"weight_ih_l{k}{suffix}"] = np.array(np.asarray(d["w_ih"], dtype).T, order="C")
            out[f"weight_hh_l{k}{suffix}"] = np.array(np.asarray(d["w_hh"], dtype).T, order="C")
            out[f"bias_ih_l{k}{suffix}"] = np.array(d["b_ih"], dtype)
            out[f"bias_hh_l{k}{suffix}"] = np.array(d["b_hh"], dtype)
            if "w_hr" in d:
                out[f"weight_hr_l{k}{suffix}"] = np.array(np.asarray(d["w_hr"], dtype).T,
                                                          order="C")
    return out
