"""BERT-small pretraining step (MLM + NSP), d2l's BERT at ANCHORS.md's size.

vocab 10k, d 256, 4 heads, FFN 512 (ReLU), 2 post-LN encoder layers, sequence 64 (full length,
no padding), batch 32, 10 masked positions per sequence with the MLM head on the gathered
positions only, dropout 0, Adam lr 1e-3. The fdl row is pending until fdl has a BERT model;
the PyTorch references are measured now so the gap is known.
"""

from __future__ import annotations

from scripts.bench import common
from scripts.bench.api import Workload

try:
    from fdl.models.sequence import bert as _bert  # noqa: F401

    _PENDING = "fdl.models.sequence.bert exists; its benchmark row is not wired yet"
except Exception as e:  # noqa: BLE001
    _PENDING = f"`fdl.models.sequence.bert` does not exist yet ({type(e).__name__}: {e})"


def _torch(compile_model: bool):
    def build():
        from scripts.bench.references import torch_models

        return torch_models.bert_step(compile_model)

    return build


WORKLOADS = [
    Workload(
        name="bert_small",
        description=(
            "BERT-small MLM+NSP pretraining step: vocab 10k, d 256, 4 heads, FFN 512 (ReLU), 2 "
            "post-LN encoder layers, learned positions, sequence 64 (full length), batch 32, 10 "
            "masked positions per sequence (MLM head on the gathered positions), dropout 0, Adam "
            "lr 1e-3. PyTorch: `nn.TransformerEncoder`."
        ),
        impls={"PyTorch eager": _torch(False), "torch.compile": _torch(True)},
        flops=common.bert_flops(**common.BERT),
        flops_note="analytic matmul count, forward x 3",
        pending=_PENDING,
        quick_steps=20,
        steps=30,
    )
]
