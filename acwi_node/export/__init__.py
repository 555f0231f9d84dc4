"""Delivery of result objects to DICOM destinations.

The names below come from :mod:`acwi_node.export.scu` on first use: importing a submodule
(``acwi_node.export.destination_commands``, which the command line parser loads for every
command, ``acwi-node health`` included) does not load pynetdicom, pydicom and NumPy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from acwi_node.export.scu import FileOutcome, SendReport, echo, send_files

__all__ = ["FileOutcome", "SendReport", "echo", "send_files"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("acwi_node.export.scu"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
