"""ACWI Node: a clinical AI inference node for PACS."""

__version__ = "0.1.0"
