"""The body a ``[[notify]]`` webhook gets, in the shape it reads (``format``).

* ``json``: the whole notification object (README "Notifications"), for a pager gateway, an
  on-call system or a script;
* ``text``: ``{"text": ...}`` alone, the one-line message, which the incoming webhooks of
  Slack, Mattermost, Rocket.Chat and Google Chat show as it is;
* ``teams``: a Microsoft Teams message holding an Adaptive Card (Teams' workflow webhooks,
  "When a Teams webhook request is received"): the message, and a button to the case, the
  dashboard or the monitoring page where the notification has a link.

The ledger keeps the whole object whatever the format: the shape is made at each POST.
"""

from __future__ import annotations

from typing import Any, Literal

NotifyFormat = Literal["json", "text", "teams"]

#: The links a notification may carry, the first found becoming the card's button.
LINKS = (("case_url", "Open the case"), ("study_url", "Open the study"),
         ("dashboard_url", "Open the dashboard"),
         ("monitoring_url", "Open the monitoring"))  # fmt: skip


def shape(fmt: NotifyFormat, payload: dict[str, Any]) -> dict[str, Any]:
    """The body to POST for ``payload`` in ``fmt``."""
    text = str(payload.get("text", ""))
    if fmt == "text":
        return {"text": text}
    if fmt == "teams":
        card: dict[str, Any] = {
            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "type": "AdaptiveCard",
            "version": "1.4",
            "body": [{"type": "TextBlock", "text": text, "wrap": True}],
        }
        link = next(((payload[k], title) for k, title in LINKS if payload.get(k)), None)
        if link is not None:
            card["actions"] = [{"type": "Action.OpenUrl", "title": link[1], "url": link[0]}]
        return {
            "type": "message",
            "attachments": [
                {
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "contentUrl": None,
                    "content": card,
                }
            ],
        }
    return payload
