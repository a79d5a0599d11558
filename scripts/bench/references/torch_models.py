"""PyTorch references (idiomatic: ``nn.Module`` in NCHW, ``torch.optim.SGD``, the usual
``zero_grad / loss.backward() / step`` loop; ``torch.compile`` variants compile the model
(forward and, through AOTAutograd, its backward); threads pinned by the harness to JAX's count).
Char-LM uses the fused ``nn.LSTM`` / ``nn.GRU`` (time-major) and ``clip_grad_norm_``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scripts.bench import common


def lenet_bn() -> nn.Module:
    """d2l's BatchNorm LeNet (``nn.Sequential``), input (N, 1, 28, 28)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(256, 120), nn.BatchNorm1d(120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(),
        nn.Linear(84, 10),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18, BasicBlock [2,2,2,2]. CIFAR stem (default): conv3x3(64)-BN-ReLU, no max-pool;
    ``imagenet_stem``: torchvision's conv7x7/2(64)-BN-ReLU-maxpool3x3/2."""

    def __init__(self, num_classes: int = 10, imagenet_stem: bool = False):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(64), nn.ReLU())
        blocks, cin = [], 64
        for s, f in enumerate((64, 128, 256, 512)):
            blocks += [BasicBlock(cin, f, 1 if s == 0 else 2), BasicBlock(f, f, 1)]
            cin = f
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _classifier(model: nn.Module, x, y, lr, momentum, compile_model: bool):
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    fwd = torch.compile(model) if compile_model else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def lenet_step(compile_model: bool = False):
    h = common.LENET
    x, y = common.image_batch(h["batch"], 28, 1, 10)
    torch.manual_seed(0)
    return _classifier(lenet_bn(), torch.from_numpy(common.nchw(x)), torch.from_numpy(y).long(),
                       h["lr"], h["momentum"], compile_model)


def resnet18_step(compile_model: bool = False):
    h = common.RESNET
    x, y = common.image_batch(h["batch"], 32, 3, h["classes"])
    torch.manual_seed(0)
    return _classifier(ResNet18(h["classes"]), torch.from_numpy(common.nchw(x)),
                       torch.from_numpy(y).long(), h["lr"], h["momentum"], compile_model)


class CharLM(nn.Module):
    def __init__(self, kind: str, vocab: int, hidden: int):
        super().__init__()
        self.vocab = vocab
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(vocab, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens):  # (T, B) int64, zero initial state
        h, _ = self.rnn(F.one_hot(tokens, self.vocab).float())
        return self.out(h)


def charlm_step(kind: str):
    h = common.CHARLM
    tokens, targets = common.char_batch(h["batch"], h["steps"], h["vocab"])
    tokens = torch.from_numpy(tokens.T.copy()).long()
    targets = torch.from_numpy(targets.T.copy()).long()
    torch.manual_seed(0)
    model = CharLM(kind, h["vocab"], h["hidden"])
    opt = torch.optim.SGD(model.parameters(), lr=h["lr"])

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(tokens)
        loss = F.cross_entropy(logits.reshape(-1, h["vocab"]), targets.reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), h["clip"])
        opt.step()
        return loss.item()

    return step


class BERTSmall(nn.Module):
    """d2l's BERT (post-LN encoder, ReLU FFN) for MLM + NSP with the MLM head on the gathered
    masked positions only; dropout 0 so every implementation does the same arithmetic."""

    def __init__(self, vocab: int, d: int, heads: int, ffn: int, layers: int, max_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.seg = nn.Embedding(2, d)
        self.pos = nn.Parameter(torch.randn(1, max_len, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, activation="relu",
                                           batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.mlm = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.LayerNorm(d), nn.Linear(d, vocab))
        self.nsp_hidden = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.nsp = nn.Linear(d, 2)

    def forward(self, tokens, segments, pred_positions):
        x = self.tok(tokens) + self.seg(segments) + self.pos[:, : tokens.shape[1]]
        x = self.encoder(x)
        b, p = pred_positions.shape
        gathered = x[torch.arange(b).unsqueeze(1), pred_positions]  # (B, P, d)
        return self.mlm(gathered), self.nsp(self.nsp_hidden(x[:, 0]))


def bert_step(compile_model: bool = False):
    h = common.BERT
    data = common.bert_batch(**{k: h[k] for k in ("batch", "seq", "vocab", "masked")})
    tokens, segments, positions, mlm_y, nsp_y = (torch.from_numpy(a).long() for a in data)
    torch.manual_seed(0)
    model = BERTSmall(h["vocab"], h["d"], h["heads"], h["ffn"], h["layers"], h["seq"])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=h["lr"])
    fwd = torch.compile(model) if compile_model else model

    def step():
        opt.zero_grad(set_to_none=True)
        mlm_logits, nsp_logits = fwd(tokens, segments, positions)
        loss = (F.cross_entropy(mlm_logits.reshape(-1, h["vocab"]), mlm_y.reshape(-1))
                + F.cross_entropy(nsp_logits, nsp_y))
        loss.backward()
        opt.step()
        return loss.item()

    return step
