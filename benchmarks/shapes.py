"""Parameter shapes of real models, written out by hand so the harness needs neither torchvision nor
transformers. The order is the models' ``named_parameters()`` order."""

from __future__ import annotations

import random

Shape = tuple[int, ...]


def resnet50() -> list[Shape]:
    """torchvision's resnet50: 161 tensors, 25,557,032 parameters."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            width, out = planes, planes * 4
            shapes += [(width, inplanes, 1, 1), (width,), (width,),   # conv1, bn1
                       (width, width, 3, 3), (width,), (width,),      # conv2, bn2
                       (out, width, 1, 1), (out,), (out,)]            # conv3, bn3
            if block == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]     # downsample conv, bn
            inplanes = out
    return shapes + [(1000, 2048), (1000,)]                          # fc


def gpt2_small() -> list[Shape]:
    """GPT-2 small (12 layers, d=768, vocab 50257, tied lm_head): 148 tensors, 124,439,808 parameters.

    Linear weights are written in torch.nn.Linear's (out, in) layout; the count is the same as the
    Hugging Face Conv1D layout."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    block = [(d,), (d,),                    # ln_1
             (3 * d, d), (3 * d,),          # attn.c_attn
             (d, d), (d,),                  # attn.c_proj
             (d,), (d,),                    # ln_2
             (4 * d, d), (4 * d,),          # mlp.c_fc
             (d, 4 * d), (d,)]              # mlp.c_proj
    return [(vocab, d), (context, d)] + block * layers + [(d,), (d,)]


def odd_sizes(count: int, low: int, high: int, seed: int = 0) -> list[Shape]:
    """``count`` 1-d tensors of odd sizes in [low, high): never a multiple of any vector width."""
    rng = random.Random(seed)
    return [(rng.randrange(low, high) | 1,) for _ in range(count)]


def numel(shapes: list[Shape]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total
