"""The models of the end-to-end family, each written twice: with torch's modules, and with danlu's modules
where danlu has a kernel for the work (BatchNorm with its activation and the block's residual add, dropout,
dropout + residual add). Everything else (convolutions, linear layers, attention, LayerNorm, GELU) is
torch's in both, so the two models differ exactly in what danlu replaces.

The torch version is what a careful torch user writes (torchvision's ResNet: BatchNorm, then ReLU in
place, the residual added in place before the last ReLU of a block); the danlu version is written out
explicitly with danlu's classes, not converted from the torch one.

Modules whose work danlu replaces are instances of the classes in ``REPLACED`` (by category): the
end-to-end family labels their calls in the profile to measure the share of the step they take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import danlu.functional
import danlu.nn

# ------------------------------------------------------------------------------------- ResNet-18 (CIFAR)


class TorchBNReLU(nn.BatchNorm2d):
    """BatchNorm2d, then ReLU in place (torchvision's bn1 + relu). A BatchNorm2d subclass, so the state_dict
    keys are those of danlu's BatchNormAct2d."""

    def forward(self, x):
        return torch.relu_(super().forward(x))


class TorchBNAddReLU(nn.BatchNorm2d):
    """BatchNorm2d, the residual added in place, then ReLU in place (torchvision's bn2 + add + relu)."""

    def forward(self, x, residual):
        out = super().forward(x)
        out += residual
        return torch.relu_(out)


class BasicBlock(nn.Module):
    """ResNet's basic block: conv3x3, BN+ReLU, conv3x3, BN + shortcut + ReLU; the shortcut is a strided
    1x1 conv and a BatchNorm where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, danlu_modules: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        if danlu_modules:
            self.bn1 = danlu.nn.BatchNormAct2d(c_out, activation="relu")
            self.bn2 = danlu.nn.BatchNormAct2d(c_out, activation="relu")  # forward(x, residual)
            norm = danlu.nn.BatchNorm2d
        else:
            self.bn1, self.bn2, norm = TorchBNReLU(c_out), TorchBNAddReLU(c_out), nn.BatchNorm2d
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out))

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), identity)


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (the CIFAR variant: a 3x3 stem, no max-pool; maps 32x32 down to 4x4),
    ``width`` channels in the first stage (64 in the real model)."""

    def __init__(self, danlu_modules: bool, num_classes: int = 10, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.stem_norm = danlu.nn.BatchNormAct2d(width, activation="relu") if danlu_modules else TorchBNReLU(width)
        blocks, c_in = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for index in range(2):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride, danlu_modules))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem_norm(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -------------------------------------------------------------------------------------- transformer block


class TorchDropoutAdd(nn.Module):
    """residual + dropout(x), torch's way."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x, residual):
        return residual + F.dropout(x, self.p, self.training)


class DanluDropoutAdd(nn.Module):
    """residual + dropout(x) in one pass each way (danlu.functional.dropout_add)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x, residual):
        return danlu.functional.dropout_add(x, residual, self.p, training=self.training)


class TransformerBlock(nn.Module):
    """A pre-LayerNorm transformer encoder block: x + dropout(attention(LN(x))), then
    x + dropout(W2 dropout(GELU(W1 LN(x)))). Attention itself has no dropout (torch's SDPA), so both
    versions run the same attention kernel."""

    def __init__(self, dim: int, heads: int, p: float, danlu_modules: bool):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        dropout_add = DanluDropoutAdd if danlu_modules else TorchDropoutAdd
        self.attn_residual, self.mlp_residual = dropout_add(p), dropout_add(p)
        self.mlp_dropout = danlu.nn.Dropout(p) if danlu_modules else nn.Dropout(p)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        x = self.attn_residual(self.proj(attention), x)
        hidden = self.mlp_dropout(F.gelu(self.fc1(self.norm2(x))))
        return self.mlp_residual(self.fc2(hidden), x)


class Transformer(nn.Module):
    """``depth`` transformer blocks over token embeddings, a final LayerNorm and a classifier of the mean
    token (a ViT-style encoder without the patching)."""

    def __init__(self, danlu_modules: bool, dim: int = 256, depth: int = 4, heads: int = 4, p: float = 0.1,
                 num_classes: int = 10):
        super().__init__()
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, p, danlu_modules) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


# Modules whose work (forward and backward) danlu's kernels replace, by category (TorchBNReLU and
# TorchBNAddReLU are BatchNorms too). A nested match would be counted once.
REPLACED = {
    "batchnorm": (nn.modules.batchnorm._BatchNorm,),
    "dropout": (TorchDropoutAdd, DanluDropoutAdd, nn.Dropout),
}
