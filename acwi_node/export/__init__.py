"""Delivery of result objects to DICOM destinations."""

from acwi_node.export.scu import FileOutcome, SendReport, echo, send_files

__all__ = ["FileOutcome", "SendReport", "echo", "send_files"]
