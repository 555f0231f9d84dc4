"""Network architectures."""

from __future__ import annotations

from typing import Any

from models.networks.amrinet import AMRINet, AMRINetConfig
from models.networks.dianet import DIANet, DIANetConfig, DIANetOutput, Encoding, HeadOutput

#: Architecture names as written in a manifest's ``architecture`` field.
ARCHITECTURES: tuple[str, ...] = ("dianet", "amrinet")
Network = DIANet | AMRINet


def build(architecture: str, config: dict[str, Any]) -> Network:
    """An untrained network of the named architecture from its ``architecture_config``."""
    if architecture == "dianet":
        return DIANet(DIANetConfig.from_dict(config))
    if architecture == "amrinet":
        return AMRINet(AMRINetConfig.from_dict(config))
    raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")


def feature_stride(architecture: str, config: dict[str, Any]) -> int:
    """Input pixels per feature-map cell (the CAM's and the dense heads' stride)."""
    depth = len(config.get("widths", [0] * 5))
    if architecture == "dianet":  # fused at a pyramid level
        depth = (
            depth - int(config.get("pyramid_levels", 3)) + int(config.get("fusion_level", 1)) + 1
        )
    return int(2**depth)


__all__ = [
    "ARCHITECTURES",
    "AMRINet",
    "AMRINetConfig",
    "DIANet",
    "DIANetConfig",
    "DIANetOutput",
    "Encoding",
    "HeadOutput",
    "Network",
    "build",
    "feature_stride",
]
