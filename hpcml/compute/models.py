"""The models hpcml trains out of the box: an MLP whose width and depth set its cost."""

from __future__ import annotations

from torch import nn

from hpcml.config import ModelConfig


def build_mlp(cfg: ModelConfig, input_dim: int, num_classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    width_in = input_dim
    for _ in range(cfg.depth):
        layers += [nn.Linear(width_in, cfg.width), nn.ReLU()]
        width_in = cfg.width
    layers.append(nn.Linear(width_in, num_classes))
    return nn.Sequential(*layers)
