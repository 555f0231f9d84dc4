"""The administrators' pages (dashboard, studies, a study's trace, models, monitoring) show
their times on the hospital's clock (``monitoring.timezone``) with its offset, as the worklist,
the decided cases and a case's page do: not in UTC."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from acwi_node.config import load_settings
from acwi_node.ledger import Ledger
from acwi_node.ledger.retrievals import Retrievals
from acwi_node.review import views
from acwi_node.web.api import create_app
from tests.support.review_case import add_user, sign_in
from tests.support.study_flow import analyse, deliver, receive, route_all, study_id

ZONE = "Asia/Kolkata"  # +0530: no UTC time reads as one of its times
SOURCE = {"name": "pacs", "ae_title": "PACS", "host": "pacs.example", "port": 104}
#: A date and time as the pages showed them in UTC: with seconds, or a "T", or "UTC".
UTC_SHOWN = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(?::\d\d)?+(?! [+-]\d{4})")


def test_the_admin_pages_show_the_hospitals_clock(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        node={"data_dir": tmp_path / "data"},
        ingest={"fsync": False},
        review={"cookie_secure": False},
        monitoring={"timezone": ZONE},
        sources=[SOURCE],
        destinations=[{**SOURCE, "host": "127.0.0.1"}],
    )
    ledger = Ledger(settings.database_url)
    try:
        receive(settings, ledger, "1.2.3", "1.2.3.1")
        analyse(settings, ledger, "1.2.3")
        deliver(ledger)
        receive(settings, ledger, "1.2.4", "1.2.4.1")
        (job,) = ledger.complete_study(study_id(ledger, "1.2.4"), 1, route_all)
        assert ledger.claim_job(job, lease_s=60) is not None
        assert ledger.fail_job(job, "the model failed")  # a failed study
        Retrievals(ledger).request("pacs", {"study_uid": "1.2.5"}, "root")
        add_user(ledger, "root", "admin")
        study = ledger.get_study("1.2.3")
        assert study is not None
        with TestClient(create_app(settings, ledger)) as client:
            sign_in(client, "root")
            pages = {
                path: client.get(path).text
                for path in (
                    "/review/dashboard",
                    "/review/studies",
                    "/review/studies/1.2.3",
                    "/review/models",
                    "/review/monitoring",
                )
            }
    finally:
        ledger.dispose()
    for path, page in pages.items():
        assert " UTC<" not in page and "(UTC)" not in page, path
        assert "Times in UTC" not in page, path
        shown = [m.group(0) for m in UTC_SHOWN.finditer(page)]
        assert shown == [], (path, shown)
    last = views.wall_clock(study["last_received_at"], ZONE, shown="%Y-%m-%d %H:%M:%S")
    assert last.endswith("+0530") and f"<td>{last}</td>" in pages["/review/studies"]
    assert re.search(r'<td class="time">[-0-9]{10} [:0-9]{8} \+0530</td>', pages["/review/models"])
    trace = pages["/review/studies/1.2.3"]
    assert "Times on the hospital's clock, with their offset from UTC." in trace
    assert len(re.findall(r'<td class="time">[-0-9]{10} [:0-9]{8} \+0530</td>', trace)) >= 3
    dashboard = pages["/review/dashboard"]
    assert re.search(
        r'<tr id="outbox-pacs">.*?<td>[-0-9]{10} [:0-9]{5} \+0530</td>', dashboard, re.S
    )
    assert re.search(
        r'<tr id="retrieval-\d+">.*?<td>[-0-9]{10} [:0-9]{5} \+0530</td>', dashboard, re.S
    )
    assert re.search(
        r'<a href="/review/studies/1.2.4">.*?<td>[-0-9]{10} [:0-9]{5} \+0530</td>', dashboard, re.S
    )
