"""Notifications: webhooks told of what needs someone soon (``[[notify]]``).

:mod:`.events` finds what happened (a case the model asked about landing on the worklist, a
finding of given labels, a failed study, a model monitoring signal that shifted) in the
ledger and queues one notification per target and thing
(:class:`~acwi_node.ledger.models.Notification`); :mod:`.sender` POSTs them as JSON,
retrying with back-off. Both run in the exporter process. What is found, not hooked:
nothing is lost when the process that analysed or failed a study dies, and a notification is
queued once however often the ledger is read. The JSON holds no patient data.
"""

from acwi_node.notify.events import queue_events
from acwi_node.notify.sender import Notifier, post_notification

__all__ = ["Notifier", "post_notification", "queue_events"]
