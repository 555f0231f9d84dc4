"""Network architectures."""

from models.networks.dianet import DIANet, DIANetConfig, DIANetOutput, Encoding, HeadOutput

__all__ = ["DIANet", "DIANetConfig", "DIANetOutput", "Encoding", "HeadOutput"]
