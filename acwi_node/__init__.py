"""ACWI Node: a clinical AI inference node for PACS."""

__version__ = "0.1.0"

#: Manufacturer (0008,0070) of every object the node writes (and how it knows them when they
#: come back: :mod:`acwi_node.ingest.own_results`).
MANUFACTURER = "ACWI Node"
