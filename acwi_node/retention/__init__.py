"""Storage retention: finished studies' images and result files leave the node's disk
(:mod:`.sweep` for the policy and the files, :mod:`.store` for the ledger's part), and later
the ledger's own records of them are compacted (:mod:`.records`)."""

from acwi_node.retention.sweep import DiskSpace, Retention, SweepReport, disk_space

__all__ = ["DiskSpace", "Retention", "SweepReport", "disk_space"]
