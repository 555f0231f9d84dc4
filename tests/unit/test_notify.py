"""``[[notify]]`` webhooks: what is found in the ledger, the JSON POSTed to a real HTTP server,
retries, refusals, and the command that tests a webhook. On SQLite and (integration)
PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from acwi_node.cli import main
from acwi_node.config import ConfigError, Settings, load_settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, Notification, ReviewItem, utcnow
from acwi_node.notify import Notifier, queue_events
from acwi_node.observability.metrics import ledger_registry
from acwi_node.review.store import ReviewStore
from acwi_node.review.views import destination_outboxes
from tests.support.http_proxy import FakeProxy
from tests.support.ports import free_port
from tests.support.study_flow import analyse, receive
from tests.support.webhook import WebhookServer


def _settings(base: Settings, *targets: dict[str, Any]) -> Settings:
    """``base`` (a ledger_node's settings) with these ``[[notify]]`` targets."""
    return load_settings(
        None,
        node={"data_dir": base.data_dir, "database_url": base.database_url},
        ingest={"fsync": False},
        review={"public_url": "https://ai-node.example.org/"},
        notify=list(targets),
    )


def _case(settings: Settings, ledger: Ledger, study: str, *, priority: int = 0) -> int:
    receive(settings, ledger, study, f"{study}.1")
    analyse(settings, ledger, study, needs_review=True)
    with ledger.session() as s:
        item = s.scalars(select(ReviewItem).order_by(ReviewItem.id.desc())).first()
        assert item is not None
        item.priority = priority
        return item.id


def _states(ledger: Ledger) -> list[tuple[str, str, str, int]]:
    with ledger.session() as s:
        return [
            (n.target, n.key, n.state.value, n.attempts)
            for n in s.scalars(select(Notification).order_by(Notification.id)).all()
        ]


def test_a_target_must_be_a_web_address_and_a_finding_needs_labels(tmp_path: Path) -> None:
    for target, said in [
        ({"name": "a", "url": "ftp://x/hook"}, "http:// or https://"),
        ({"name": "a", "url": "https:///hook"}, "http:// or https://"),
        ({"name": "a", "url": "https://x/", "events": ["finding"]}, "needs labels"),
        ({"name": "a", "url": "https://x/", "events": []}, "at least 1"),
        ({"name": "a", "url": "https://x/", "events": ["nonsense"]}, "review"),
    ]:
        with pytest.raises(ConfigError, match=said):
            load_settings(None, node={"data_dir": tmp_path}, notify=[target])
    with pytest.raises(ConfigError, match="public_url must be"):
        load_settings(None, node={"data_dir": tmp_path}, review={"public_url": "ai.example"})
    with pytest.raises(ConfigError, match="used twice"):
        load_settings(
            None,
            node={"data_dir": tmp_path},
            notify=[{"name": "a", "url": "https://x/"}, {"name": "a", "url": "https://y/"}],
        )


def test_events_are_posted_once_with_no_patient_data(
    ledger_node: tuple[Settings, Ledger], tmp_path: Path
) -> None:
    """A case on the worklist, a finding and a failed study each reach the targets that watch
    for them, once however often the ledger is read, as JSON with a link to the case, a
    ``text`` a chat channel shows, and the bearer token; a STAT-only target hears of none of
    these routine cases."""
    base, ledger = ledger_node
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with WebhookServer() as hook, WebhookServer() as stat:
        settings = _settings(
            base,
            {"name": "pager", "url": hook.url, "events": ["review", "finding", "failed"],
             "labels": ["nodule"], "min_probability": 0.6, "token_file": str(token)},
            {"name": "stat", "url": stat.url, "min_priority": 1},
        )  # fmt: skip
        item = _case(settings, ledger, "1.2.3")
        receive(settings, ledger, "1.2.4", "1.2.4.1")
        job = analyse(settings, ledger, "1.2.4")
        assert ledger.fail_job(job, "the model cannot read this image")
        notifier = Notifier(settings, ledger)
        assert notifier.tick() == 3  # the case, its finding (0.7 >= 0.6), the failure
        assert notifier.tick() == 0 and queue_events(settings, ledger) == 0
        # (the failed study's job is no finding: its result never reached the PACS)
        assert sorted(hook.events()) == [
            ("failed", "1.2.4"), ("finding", "1.2.3"), ("review", "1.2.3"),
        ]  # fmt: skip
        assert stat.received == []
        review = next(r for r in hook.received if r["json"]["event"] == "review")
        body = review["json"]
        assert review["path"] == "/hooks/acwi"
        assert review["headers"]["Authorization"] == "Bearer s3cret"
        assert review["headers"]["Content-Type"] == "application/json"
        assert body["case_id"] == item
        assert body["case_url"] == f"https://ai-node.example.org/review/cases/{item}"
        assert body["text"].startswith("ACWI Node: A case needs review")
        assert body["text"].endswith(body["case_url"])
        assert (body["predicted_label"], body["priority"]) == ("nodule", 0)
        assert body["model"] == {"name": "acwi-dianet-chest", "version": "1.0.0"}
        failed = next(r["json"] for r in hook.received if r["json"]["event"] == "failed")
        assert failed["reason"] and "cannot read" in failed["text"]
        finding = next(r["json"] for r in hook.received if r["json"]["event"] == "finding")
        assert (finding["label"], finding["probability"]) == ("nodule", 0.7)
        for r in hook.received:  # what the ledger knows, nothing of the patient
            assert not {"patient_name", "patient_id", "accession_number"} & set(r["json"])
        assert all(state == "delivered" for _, _, state, _ in _states(ledger))
        metrics = ledger_registry(settings, ledger)
        assert (
            metrics.get_sample_value(
                "acwi_notifications", {"target": "pager", "state": "delivered"}
            )
            == 3
        )

        # a STAT case: both targets; older than lookback_s when first seen: neither
        stat_item = _case(settings, ledger, "1.2.5", priority=2)
        old_item = _case(settings, ledger, "1.2.6", priority=2)
        sample = _case(settings, ledger, "1.2.7", priority=2)  # a quality-control sample
        with ledger.session() as s:
            s.execute(update(ReviewItem).where(ReviewItem.id == sample).values(sampled=True))
            s.execute(
                update(ReviewItem)
                .where(ReviewItem.id == old_item)
                .values(created_at=utcnow() - dt.timedelta(hours=2))
            )
            s.execute(
                update(Job).values(started_at=utcnow() - dt.timedelta(hours=2))
            )  # no further findings either
        notifier.tick()
        assert stat.events() == [("review", "1.2.5")]
        assert stat.received[0]["json"]["text"].startswith("ACWI Node: A STAT case")
        assert ("review", "1.2.5") in hook.events() and ("review", "1.2.6") not in hook.events()
        assert ("review", "1.2.7") not in hook.events()
        assert stat.received[0]["json"]["case_id"] == stat_item


def test_a_webhook_that_is_down_is_tried_again_and_one_that_refuses_is_not(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """500 and no connection: tried again after the back-off (5 s, 10 s, ...), failed after
    max_attempts; 400: failed at once, with the answer kept."""
    base, ledger = ledger_node
    dead = f"http://127.0.0.1:{free_port()}/hook"
    with WebhookServer() as hook, WebhookServer() as strict:
        settings = _settings(
            base,
            {"name": "flaky", "url": hook.url},
            {"name": "strict", "url": strict.url},
            # no patience with an outage: each attempt counts
            {
                "name": "down",
                "url": dead,
                "max_attempts": 2,
                "timeout_s": 2,
                "outage_patience_s": 0,
            },
        )
        hook.answers.extend([500, 500])
        strict.answers.append(400)
        _case(settings, ledger, "1.2.3")
        notifier = Notifier(settings, ledger)
        t0 = utcnow()
        notifier.tick(now=t0)
        states = {target: (state, n) for target, _, state, n in _states(ledger)}
        assert states == {
            "flaky": ("pending", 1),
            "strict": ("failed", 1),
            "down": ("pending", 1),
        }
        with ledger.session() as s:
            refused = s.scalars(select(Notification).where(Notification.target == "strict")).one()
            assert refused.last_status == 400 and "refused" in refused.last_error
            down = s.scalars(select(Notification).where(Notification.target == "down")).one()
            assert down.last_status is None and "Connection" in down.last_error
        assert notifier.tick(now=t0 + dt.timedelta(seconds=1)) == 0  # backing off
        notifier.tick(now=utcnow() + dt.timedelta(seconds=6))  # flaky: 500 again
        notifier.tick(now=utcnow() + dt.timedelta(seconds=11))  # flaky: 200
        states = {target: (state, n) for target, _, state, n in _states(ledger)}
        assert states == {
            "flaky": ("delivered", 3),
            "strict": ("failed", 1),
            "down": ("failed", 2),
        }
        assert len(hook.received) == 3 and len(strict.received) == 1
        # the administrators' outboxes (dashboard, GET /api/destinations) show each webhook
        rows = {r["name"]: r for r in destination_outboxes(ReviewStore(ledger), settings)}
        assert (rows["Notify: flaky"]["pending"], rows["Notify: flaky"]["failed"]) == (0, 0)
        assert rows["Notify: flaky"]["last_delivered_at"] is not None
        assert rows["Notify: strict"]["failed"] == 1
        assert "HTTP 400" in rows["Notify: strict"]["last_error"]
        assert rows["Notify: down"]["failed"] == 1 and rows["Notify: down"]["last_error"]


def test_a_webhook_that_cannot_be_reached_is_waited_for_without_counting_attempts(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """No connection, or a gateway's 503: an outage, tried again with the back-off and not
    counted against max_attempts, until outage_patience_s has passed; the dashboard and the
    metrics say since when."""
    base, ledger = ledger_node
    dead = f"http://127.0.0.1:{free_port()}/hook"
    with WebhookServer() as gateway:
        settings = _settings(
            base,
            {"name": "down", "url": dead, "max_attempts": 2, "outage_patience_s": 600},
            {"name": "gateway", "url": gateway.url, "max_attempts": 2},
        )
        gateway.answers.extend([503, 502, 504])
        _case(settings, ledger, "1.2.3")
        notifier = Notifier(settings, ledger)
        for k in range(4):
            notifier.tick(now=utcnow() + dt.timedelta(seconds=400 * k))
        states = {target: (state, n) for target, _, state, n in _states(ledger)}
        # 4 attempts each: the gateway's fourth was answered; nothing counted before it
        assert states == {"down": ("pending", 0), "gateway": ("delivered", 1)}
        assert len(gateway.received) == 4
        with ledger.session() as s:
            down = s.scalars(select(Notification).where(Notification.target == "down")).one()
            assert (down.outage_attempts, down.unreachable_since is not None) == (4, True)
            answered = s.scalars(select(Notification).where(Notification.target == "gateway")).one()
            assert (answered.outage_attempts, answered.unreachable_since) == (0, None)
        rows = {r["name"]: r for r in destination_outboxes(ReviewStore(ledger), settings)}
        assert rows["Notify: down"]["unreachable_since"] is not None
        assert rows["Notify: down"]["pending"] == 1
        assert rows["Notify: gateway"]["unreachable_since"] is None
        metrics = ledger_registry(settings, ledger)
        assert metrics.get_sample_value("acwi_webhook_unreachable_seconds", {"target": "down"})
        assert (
            metrics.get_sample_value("acwi_webhook_unreachable_seconds", {"target": "gateway"})
            is None
        )
        # Unreachable for longer than its patience: it fails, saying since when.
        with ledger.session() as s:
            s.execute(
                update(Notification)
                .where(Notification.target == "down")
                .values(unreachable_since=utcnow() - dt.timedelta(seconds=601))
            )
        notifier.tick(now=utcnow() + dt.timedelta(seconds=2000))
        with ledger.session() as s:
            down = s.scalars(select(Notification).where(Notification.target == "down")).one()
            assert (down.state.value, down.attempts) == ("failed", 0)
            assert down.last_error.startswith("unreachable since ")
            assert "(notify down outage_patience_s): ConnectionRefusedError" in down.last_error


def test_two_exporter_processes_post_each_notification_once(
    ledger_node: tuple[Settings, Ledger],
) -> None:
    """Two notifiers (two exporter processes) tick at once against a slow webhook: each case
    is POSTed once."""
    base, ledger = ledger_node
    with WebhookServer() as hook:
        hook.delay_s = 0.05
        settings = _settings(base, {"name": "chat", "url": hook.url})
        for n in range(6):
            _case(settings, ledger, f"1.2.{n + 1}")
        queue_events(settings, ledger)
        notifiers = [Notifier(settings, ledger) for _ in range(2)]
        threads = [threading.Thread(target=n.tick) for n in notifiers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(hook.events()) == [("review", f"1.2.{n + 1}") for n in range(6)]
        assert {state for _, _, state, _ in _states(ledger)} == {"delivered"}


def test_the_notify_test_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with WebhookServer() as hook:
        hook.answers.append(200)
        config = tmp_path / "acwi-node.toml"
        config.write_text(
            f'[node]\ndata_dir = "{tmp_path / "data"}"\nae_title = "ACWI-TEST"\n\n'
            f'[[notify]]\nname = "chat"\nurl = "{hook.url}"\n\n'
            f'[[notify]]\nname = "gone"\nurl = "http://127.0.0.1:{free_port()}/"\ntimeout_s = 2\n'
        )
        assert main(["--config", str(config), "notify", "test", "chat"]) == 0
        assert hook.events() == [("test", "")]
        assert "ACWI-TEST" in hook.received[0]["json"]["text"]
        assert "chat: delivered (HTTP 200)" in capsys.readouterr().out
        assert main(["--config", str(config), "notify", "test"]) == 1  # "gone" is down
        assert "gone: FAILED" in capsys.readouterr().out
        assert main(["--config", str(config), "notify", "test", "nobody"]) == 2


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_webhook_beyond_an_http_proxy(
    ledger_node: tuple[Settings, Ledger], tmp_path: Path, scheme: str
) -> None:
    """``proxy``: an ``http`` webhook is asked for in absolute form through the proxy, an
    ``https`` one through a CONNECT tunnel (its certificate checked against ``[notify.tls]``);
    a proxy that asks for credentials gets them from ``proxy_username`` and the file."""
    base, ledger = ledger_node
    secret = tmp_path / "proxy-password"
    secret.write_text("pr0xy\n")
    proxy = FakeProxy(credentials=("node", "pr0xy"))
    try:
        with WebhookServer(tls=tmp_path / "pki" if scheme == "https" else None) as hook:
            target: dict[str, Any] = {
                "name": "chat", "url": hook.url, "proxy": proxy.url,
                "proxy_username": "node", "proxy_password_file": str(secret),
            }  # fmt: skip
            if scheme == "https":
                target["tls"] = {"ca_file": str(hook.ca_file)}
            settings = _settings(base, target)
            _case(settings, ledger, "1.2.3")
            Notifier(settings, ledger).tick()
            assert hook.events() == [("review", "1.2.3")]
            method, where = proxy.seen[-1]
            if scheme == "https":
                assert (method, where) == ("CONNECT", f"localhost:{hook.port}")
            else:
                assert (method, where) == ("POST", hook.url)
            assert "Proxy-Authorization" not in hook.received[0]["headers"]
            assert proxy.refused == 0
    finally:
        proxy.close()
    with pytest.raises(ConfigError, match="proxy must be"):
        _settings(base, {"name": "x", "url": "https://x/", "proxy": "https://p:1"})
    with pytest.raises(ConfigError, match="go together"):
        _settings(base, {"name": "x", "url": "https://x/", "proxy": "http://p:1",
                         "proxy_username": "u"})  # fmt: skip


def test_a_shifted_model_is_told_once_a_week(ledger_node: tuple[Settings, Ledger]) -> None:
    """A target listening for ``shift`` hears of each monitoring signal that has shifted, once
    per signal and week however often the exporter looks; a ``review`` target hears nothing
    of it."""
    from tests.support.monitoring_jobs import NEW_SCANNER, TYPICAL, Jobs

    base, ledger = ledger_node
    jobs = Jobs(ledger)
    hour, day = dt.timedelta(hours=1), dt.timedelta(days=1)
    now = utcnow()
    jobs.many(200, now - 40 * day, hour, seed=1, **TYPICAL)
    jobs.many(60, now - 6 * day, hour, seed=2, **TYPICAL)
    jobs.many(30, now - 3 * day, hour, seed=3, **NEW_SCANNER)
    with WebhookServer() as ml, WebhookServer() as pager:
        settings = _settings(
            base,
            {"name": "ml-team", "url": ml.url, "events": ["shift"]},
            {"name": "pager", "url": pager.url},
        )
        notifier = Notifier(settings, ledger)
        assert notifier.tick() == 4
        assert notifier.tick() == 0
        signals = sorted(r["json"]["signal"] for r in ml.received)
        assert signals == ["equipment", "ood_rate", "ood_score", "review_rate"]
        assert pager.received == []
        body = next(r["json"] for r in ml.received if r["json"]["signal"] == "equipment")
        assert body["event"] == "shift"
        assert body["model"] == {"name": "dianet-cxr", "version": "1.0.0"}
        assert body["recent"].endswith("Vantage Diagnostics VD-CR 12 33%")
        assert body["monitoring_url"] == "https://ai-node.example.org/review/monitoring"
        assert body["text"].startswith(
            "ACWI Node: dianet-cxr 1.0.0: Equipment (manufacturer, model) has shifted"
        )
        assert body["p_value"] < 0.001 and body["studies"] == 90
        # still shifted a week on: told again (the reports are those the exporter has)
        assert queue_events(settings, ledger, now=now + 7 * day,
                            monitoring=notifier.monitoring.get) == 4  # fmt: skip
        assert queue_events(settings, ledger, now=now + 7 * day,
                            monitoring=notifier.monitoring.get) == 0  # fmt: skip


def test_a_source_that_stopped_is_told_once_a_day(ledger_node: tuple[Settings, Ledger]) -> None:
    """A target listening for ``stopped`` hears of each source or route whose studies
    dropped, once per day however often the exporter looks."""
    from tests.support.arrivals import WEEK, Arrivals

    base, ledger = ledger_node
    now = utcnow()
    arrivals = Arrivals(ledger)
    arrivals.add(now - 5 * WEEK, "OLDCR")
    arrivals.weekly(now, "CT1", [0, 10, 9, 11, 10])
    arrivals.weekly(now, "CR2", [6, 5, 6, 5, 6])
    with WebhookServer() as ops, WebhookServer() as pager:
        settings = _settings(
            base,
            {"name": "pacs-team", "url": ops.url, "events": ["stopped"]},
            {"name": "pager", "url": pager.url},
        )
        notifier = Notifier(settings, ledger)
        assert notifier.tick() == 1
        assert notifier.tick() == 0
        assert pager.received == []
        (body,) = (r["json"] for r in ops.received)
        assert body["event"] == "stopped"
        assert (body["kind"], body["name"]) == ("source", "CT1")
        assert (body["hours"], body["studies"]) == (2, 0)
        assert body["weeks_before"] == [10, 9, 11, 10] and body["expected"] == 10.0
        assert body["text"] == (
            "ACWI Node: Studies from CT1 dropped: 0 in the last 2 h, 10.0 expected (10, 9, 11,"
            " 10 the weeks before): a forwarding rule, an AE title or a network that changed?"
            " https://ai-node.example.org/review/monitoring#traffic"
        )
        # still stopped the next day: told again
        tomorrow = now + dt.timedelta(days=1)
        assert queue_events(settings, ledger, now=tomorrow, traffic=notifier.traffic.get) == 1
        assert queue_events(settings, ledger, now=tomorrow, traffic=notifier.traffic.get) == 0


def test_a_slow_route_is_told_once_a_day(ledger_node: tuple[Settings, Ledger]) -> None:
    """A target listening for ``slow`` hears of each route whose results reach the PACS slower
    than the goal, with the step that took longest; once per route and day."""
    from tests.support.study_flow import timed_study

    base, ledger = ledger_node
    now = utcnow()
    for n in range(6):  # chest: the PACS takes 400 s to store each result
        timed_study(
            ledger, f"1.2.{n}", at=now - dt.timedelta(hours=1), steps=(2.0, 1.0, 1.0, 400.0)
        )
        timed_study(ledger, f"1.3.{n}", route="ct", at=now - dt.timedelta(hours=1))
    with WebhookServer() as ops, WebhookServer() as pager:
        settings = _settings(
            base,
            {"name": "pacs-team", "url": ops.url, "events": ["slow"]},
            {"name": "pager", "url": pager.url},
        )
        notifier = Notifier(settings, ledger)
        assert notifier.tick() == 1
        assert notifier.tick() == 0
        assert pager.received == []
        (body,) = (r["json"] for r in ops.received)
        assert (body["event"], body["route"], body["studies"]) == ("slow", "chest", 6)
        assert body["steps"]["delivery"] == {"p50": 400.0, "p95": 400.0, "max": 400.0}
        assert body["text"] == (
            "ACWI Node: results of route chest are slow: 95th percentile 6.7 min from the last"
            " instance to stored in the PACS over 6 studies in the last 24 h (goal 5.0 min); the"
            " longest step: delivery (6.7 min)"
            " https://ai-node.example.org/review/monitoring#turnaround"
        )
        # still slow the next day (the exporter's report, read at most every refresh_s)
        tomorrow = now + dt.timedelta(days=1)
        queued = queue_events(settings, ledger, now=tomorrow, turnaround=notifier.turnaround.get)
        assert queued == 1
        assert queue_events(settings, ledger, now=tomorrow, turnaround=notifier.turnaround.get) == 0


def test_a_chat_channel_gets_the_shape_it_reads(ledger_node: tuple[Settings, Ledger]) -> None:
    """``format``: the one-line message alone for Slack and its kind, an Adaptive Card with a
    button to the case for a Teams workflow webhook; the ledger keeps the whole object."""
    base, ledger = ledger_node
    with WebhookServer() as slack, WebhookServer() as teams, WebhookServer() as pager:
        settings = _settings(
            base,
            {"name": "slack", "url": slack.url, "format": "text"},
            {"name": "teams", "url": teams.url, "format": "teams"},
            {"name": "pager", "url": pager.url},
        )
        _case(settings, ledger, "1.2.5")
        assert Notifier(settings, ledger).tick() == 3
        whole = pager.received[0]["json"]
        assert slack.received[0]["json"] == {"text": whole["text"]}
        body = teams.received[0]["json"]
        assert body["type"] == "message"
        (attachment,) = body["attachments"]
        assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
        card = attachment["content"]
        assert card["type"] == "AdaptiveCard"
        assert card["body"] == [{"type": "TextBlock", "text": whole["text"], "wrap": True}]
        assert card["actions"] == [
            {"type": "Action.OpenUrl", "title": "Open the case", "url": whole["case_url"]}
        ]
        assert whole["case_url"].startswith("https://ai-node.example.org/review/cases/")
        with ledger.session() as s:
            kept = s.scalars(select(Notification).where(Notification.target == "slack")).one()
            assert kept.payload["event"] == "review"  # the whole object, whatever the format
    with pytest.raises(ConfigError, match="format"):
        _settings(base, {"name": "x", "url": "https://x/", "format": "html"})
