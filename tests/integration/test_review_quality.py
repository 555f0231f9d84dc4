"""Quality-control samples and the radiologists' agreement with the model.

A share of the studies the model was sure of goes to the worklist as quality-control samples
(``review.quality_sample_percent``), marked as such; the final verdicts on them and on the
flagged studies come back as agreement rows per model version and kind of case on the
dashboard, in ``GET /api/review/agreement``, from ``acwi-node feedback agreement`` and in
the Prometheus metrics.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from acwi_node.cli import build_parser
from acwi_node.inference.manifest import default_model_dir
from acwi_node.ledger import Ledger
from acwi_node.ledger.models import Job, ReviewItem
from acwi_node.review.commands import run as run_review_command
from acwi_node.review.feedback import export_feedback
from acwi_node.review.store import ReviewStore
from acwi_node.tasks.analyse import run_job
from acwi_node.web.api import create_app
from models.data.synth import write_study
from tests.support.review_case import (
    add_user,
    make_review_case,
    review_settings,
    sign_in,
    store_and_route,
)


def test_sure_studies_are_sampled_and_the_verdicts_measure_agreement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundled = default_model_dir() / "manifest.json"  # sure of clear phantoms
    sure = review_settings(tmp_path, model_manifest=bundled, review={"quality_sample_percent": 100})
    ledger = Ledger(sure.database_url)
    add_user(ledger)
    store = ReviewStore(ledger)
    try:
        # every study the model is sure of is a sample at 100 %
        sample_item, _ = make_review_case(sure, ledger, tmp_path, label="normal", seed=3)
        sample = store.case(sample_item)
        assert sample is not None and not sample["summary"]["needs_review"]
        assert sample["reason"] == (
            "quality-control sample (100 % of the studies the model was sure of)"
        )
        # none at 0 % (the default): a sure study stays off the worklist
        off = review_settings(tmp_path, model_manifest=bundled)
        files = write_study(tmp_path / "off", n_images=2, label="normal", seed=5, size=128)
        job_id, study_uid = store_and_route(off, ledger, files)
        assert run_job(off, ledger, job_id) == "analysed"
        with ledger.session() as s:
            assert s.get_one(Job, job_id).summary["needs_review"] is False
        assert all(item["study_uid"] != study_uid for item in ledger.worklist())
        # a study the model is unsure of (the review model) is flagged, not sampled
        flagged = review_settings(tmp_path, review={"quality_sample_percent": 100})
        flagged_item, _ = make_review_case(flagged, ledger, tmp_path, seed=4)
        with ledger.session() as s:
            kinds = {item.id: item.sampled for item in s.scalars(select(ReviewItem)).all()}
        assert kinds == {sample_item: True, flagged_item: False}
        listed = {item["id"]: item["sampled"] for item in ledger.worklist()}
        assert listed == {sample_item: True, flagged_item: False}  # GET /api/worklist too
        # the flagged study comes first though the sample is older (the same priority)
        assert [item["id"] for item in ledger.worklist()] == [flagged_item, sample_item]
        page_items = store.worklist()["items"]
        assert [item["id"] for item in page_items] == [flagged_item, sample_item]

        predicted = str(sample["summary"]["predicted_label"])
        other = next(label for label in sample["summary"]["labels"] if label != predicted)
        with TestClient(create_app(flagged, ledger)) as client:
            csrf = sign_in(client)
            # the worklist marks the sample and filters by kind
            page = client.get("/review/worklist").text
            assert page.count('<span class="badge">QC sample</span>') == 1
            assert '<option value="sample" >sample (1)</option>' in page
            only = client.get("/review/worklist", params={"kind": "sample"}).text
            # (each case link carries the filter: the next case is the next of this list)
            assert f'href="/review/cases/{sample_item}?list=kind%3Dsample"' in only
            assert f'href="/review/cases/{flagged_item}' not in only
            # so does the API; a filter value that names nothing is refused, not an empty list
            api = client.get("/api/worklist", params={"kind": "sample"}).json()
            assert [item["id"] for item in api["items"]] == [sample_item]
            for name, value in [("kind", "samples"), ("state", "bogus")]:
                refused = client.get("/api/worklist", params={name: value})
                assert refused.status_code == 422, (name, refused.text)
            for item, fields in [
                (sample_item, {"action": "override", "label": other, "reason": "missed"}),
                (flagged_item, {"action": "escalate", "reason": "second look"}),  # not final
                (flagged_item, {"action": "confirm"}),
            ]:
                done = client.post(
                    f"/review/cases/{item}/verdict",
                    data={"csrf_token": csrf, **fields},
                    follow_redirects=False,
                )
                assert done.status_code == 303, done.text

            answer = client.get("/api/review/agreement", params={"days": 30})
            assert answer.status_code == 200
            body = answer.json()
            assert body["days"] == 30 and body["quality_sample_percent"] == 100
            rows = {row["kind"]: row for row in body["rows"]}
            assert set(rows) == {"flagged", "sample"}
            assert {row["model"] for row in body["rows"]} == {"acwi-dianet-chest"}
            assert (rows["sample"]["verdicts"], rows["sample"]["agreed"]) == (1, 0)
            assert rows["sample"]["corrections"] == [[predicted, other, 1]]
            assert rows["sample"]["ci_high"] < 1.0 and rows["sample"]["ci_low"] == 0.0
            assert (rows["flagged"]["verdicts"], rows["flagged"]["agreed"]) == (1, 1)
            assert rows["flagged"]["agreement"] == 1.0
            assert rows["sample"]["sites"] == [["SITEA", 1, 0]]

            dashboard = client.get("/review/dashboard").text
            assert 'class="agreement-sample"' in dashboard
            assert f"{predicted} to {other} (1)" in dashboard
            assert "(100 % of them" in dashboard and "SITEA 0/1" in dashboard

            metrics = client.get("/metrics").text
            for kind, action, n in [
                ("sample", "override", 1),
                ("flagged", "escalate", 1),
                ("flagged", "confirm", 1),
            ]:
                line = (
                    f'acwi_review_verdicts{{action="{action}",kind="{kind}",'
                    f'model="review-model",version="{rows[kind]["version"]}"}} {n:.1f}'
                )
                assert line in metrics, line
            # the review rate counts the studies the model asked about, not the samples
            assert "\nacwi_review_jobs 1.0\n" in metrics

        # the feedback export says which rows are quality-control samples
        out = tmp_path / "feedback"
        assert export_feedback(flagged, ledger, out).images == 4
        with (out / "labels.csv").open() as fh:
            kinds_exported = {(row["verdict"], row["kind"]) for row in csv.DictReader(fh)}
        assert kinds_exported == {("override", "sample"), ("confirm", "flagged")}

        # the same rows on the command line
        args = build_parser().parse_args(["feedback", "agreement", "--days", "30", "--json"])
        assert run_review_command(flagged, args) == 0
        assert json.loads(capsys.readouterr().out)["rows"] == body["rows"]
        args = build_parser().parse_args(["feedback", "agreement"])
        assert run_review_command(flagged, args) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].startswith("final verdicts of the last 90 days")
        sample_line = next(line for line in table if " sample " in line)
        assert "0 % (0-" in sample_line and f"{predicted} to {other} (1)" in sample_line
        assert any(" flagged " in line and "100 % (" in line for line in table)
        args = build_parser().parse_args(["feedback", "agreement", "--days", "0"])
        assert run_review_command(flagged, args) == 2
        assert "--days must be 1 to 3650" in capsys.readouterr().err
    finally:
        ledger.dispose()
