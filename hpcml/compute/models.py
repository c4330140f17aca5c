"""The model hpcml trains out of the box (`model=mlp`): an MLP whose width and depth set its cost.

Any other model is a `_target_` in the config (hpcml/components.py): a class or function that returns an
`nn.Module`, built on every rank with the same seed.
"""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """`depth` hidden layers of `width` units with ReLU, then a linear layer to `num_classes` logits."""

    def __init__(self, input_dim: int, num_classes: int, width: int = 64, depth: int = 2):
        if min(input_dim, num_classes, width, depth) < 1:
            raise ValueError(
                f"MLP(input_dim={input_dim}, num_classes={num_classes}, width={width}, depth={depth}): all must be 1 or more."
            )
        layers: list[nn.Module] = []
        width_in = input_dim
        for _ in range(depth):
            layers += [nn.Linear(width_in, width), nn.ReLU()]
            width_in = width
        layers.append(nn.Linear(width_in, num_classes))
        super().__init__(*layers)
