"""Storage retention: finished studies' images and result files leave the node's disk
(:mod:`.sweep` for the policy and the files, :mod:`.store` for the ledger's part)."""

from acwi_node.retention.sweep import DiskSpace, Retention, SweepReport, disk_space

__all__ = ["DiskSpace", "Retention", "SweepReport", "disk_space"]
