"""Prometheus metrics: ledger-derived gauges after real ledger events, process-local counters."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from acwi_node.config import Settings, load_settings
from acwi_node.export.outbox import Exporter
from acwi_node.ledger import InstanceRecord, Ledger, ResultFile, RoutedJob, StudyFacts
from acwi_node.observability import metrics
from acwi_node.observability.health import OpsServer, Readiness, loop_check
from acwi_node.tasks.app import configure
from acwi_node.tasks.queue import reconcile
from acwi_node.web.api import create_app
from tests.support.ports import free_port
from tests.support.study_flow import dx_record


def rec(study: str, sop: str, ae: str) -> InstanceRecord:
    return dx_record(study, sop, ae=ae)


def to_pacs(facts: StudyFacts) -> list[RoutedJob]:
    return [RoutedJob(route="chest", model="default", destinations=["pacs"], priority=0)]


def nowhere(facts: StudyFacts) -> list[RoutedJob]:
    return []


def scrape(
    settings: Settings, ledger: Ledger
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` of the web app as {(sample name, sorted labels): value}."""
    with TestClient(create_app(settings, ledger)) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def complete(
    ledger: Ledger,
    study_uid: str,
    decide: Callable[[StudyFacts], list[RoutedJob]] = to_pacs,
) -> list[int]:
    study_id = ledger.record_instance(
        rec(study_uid, study_uid + ".1", "CT_A"), first_in_association=True
    ).study_id
    view = ledger.get_study(study_uid)
    assert view is not None
    return ledger.complete_study(study_id, view["generation"], decide)


def analyse(ledger: Ledger, job_id: int, *, review: bool, n_results: int = 1) -> None:
    assert ledger.claim_job(job_id, lease_s=30) is not None
    files = [
        ResultFile("sr", f"2.25.{job_id}{i}", "1.2.840.10008.5.1.4.1.1.88.34", f"r/{job_id}{i}.dcm")
        for i in range(n_results)
    ]
    assert ledger.finish_analysis(
        job_id,
        results=files,
        summary={"needs_review": review},
        needs_review=review,
        review_reason="uncertain" if review else "",
    )


def test_metrics_reflect_ledger_events(settings: Settings, ledger: Ledger) -> None:
    ledger.record_instance(rec("1.2.1", "1.2.1.1", "CT_A"), first_in_association=True)
    ledger.record_instance(rec("1.2.1", "1.2.1.2", "CT_A"), first_in_association=False)
    ledger.record_instance(rec("1.2.2", "1.2.2.1", "DX_B"), first_in_association=True)

    reviewed = complete(ledger, "1.2.3")
    confident = complete(ledger, "1.2.4")
    complete(ledger, "1.2.5", nowhere)
    waiting = complete(ledger, "1.2.6")
    analyse(ledger, reviewed[0], review=True, n_results=2)
    analyse(ledger, confident[0], review=False)
    due = {d.id: d for d in ledger.due_deliveries()}
    assert len(due) == 3
    first, second, third = sorted(due)
    ledger.record_delivery(first, delivered=True, status=0, error="", max_attempts=3, backoff_s=1)
    ledger.record_delivery(
        second, delivered=False, status=0xA700, error="full", max_attempts=1, backoff_s=1
    )

    m = scrape(settings, ledger)
    assert m[("acwi_ledger_up", ())] == 1
    assert m[("acwi_instances", (("calling_ae", "CT_A"),))] == 2 + 4
    assert m[("acwi_instances", (("calling_ae", "DX_B"),))] == 1
    assert m[("acwi_studies", (("state", "receiving"),))] == 2
    assert m[("acwi_studies", (("state", "not_routed"),))] == 1
    assert m[("acwi_studies", (("state", "queued"),))] == 1
    assert m[("acwi_ledger_studies_completed", ())] == 4
    assert m[("acwi_jobs_queued", ())] == 1
    assert m[("acwi_jobs", (("model", "default"), ("state", "queued")))] == 1
    assert m[("acwi_jobs", (("model", "default"), ("state", "exporting")))] == 1
    assert m[("acwi_deliveries", (("destination", "pacs"), ("state", "delivered")))] == 1
    assert m[("acwi_deliveries", (("destination", "pacs"), ("state", "failed")))] == 1
    assert m[("acwi_deliveries", (("destination", "pacs"), ("state", "pending")))] == 1
    assert m[("acwi_analysed_jobs", ())] == 2
    assert m[("acwi_review_jobs", ())] == 1
    assert m[("acwi_review_rate", ())] == pytest.approx(0.5)
    assert m[("acwi_review_items_open", ())] == 1
    assert waiting  # job 4 stays queued: the queue depth above
    disk = os.statvfs(settings.data_dir)
    assert m[("acwi_data_size_bytes", ())] == disk.f_blocks * disk.f_frsize
    assert 0 < m[("acwi_data_free_bytes", ())] <= m[("acwi_data_size_bytes", ())]


def test_broker_queue_length_of_the_embedded_broker(settings: Settings, ledger: Ledger) -> None:
    celery = configure(settings)
    job_ids = complete(ledger, "1.2.7") + complete(ledger, "1.2.8")
    before = (
        REGISTRY.get_sample_value("acwi_reconciler_requeued_total", {"trigger": "startup"}) or 0.0
    )
    sent = reconcile(celery, ledger, startup=True, requeue_after_s=60, lease_s=30)
    assert sent == len(job_ids) == 2
    assert metrics.broker_queue_length(settings) == 2
    after = REGISTRY.get_sample_value("acwi_reconciler_requeued_total", {"trigger": "startup"})
    assert after == before + 2
    m = scrape(settings, ledger)
    assert m[("acwi_broker_queue_length", (("queue", "analysis"),))] == 2


def test_metrics_answer_when_the_ledger_is_down(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        node={"data_dir": str(tmp_path), "database_url": "postgresql://nobody@127.0.0.1:1/none"},
    )
    ledger = Ledger(settings.database_url, create=False)
    m = scrape(settings, ledger)
    assert m[("acwi_ledger_up", ())] == 0
    assert ("acwi_studies", (("state", "receiving"),)) not in m


@pytest.fixture
def exporter_settings(tmp_path: Path) -> Settings:
    return load_settings(
        None,
        node={"data_dir": str(tmp_path)},
        exporter={"timeout_s": 2},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
        ],
    )


def test_exporter_counts_refused_deliveries(exporter_settings: Settings) -> None:
    ledger = Ledger(exporter_settings.database_url)
    job = complete(ledger, "1.2.9")
    analyse(ledger, job[0], review=False)
    (exporter_settings.results_dir / "r").mkdir(parents=True)
    (exporter_settings.results_dir / f"r/{job[0]}0.dcm").write_bytes(b"not sent")
    labels = {"destination": "pacs", "outcome": "refused"}
    before = REGISTRY.get_sample_value("acwi_exporter_delivery_attempts_total", labels) or 0.0
    assert Exporter(exporter_settings, ledger).tick() == 1
    after = REGISTRY.get_sample_value("acwi_exporter_delivery_attempts_total", labels)
    assert after == before + 1
    ledger.dispose()


@pytest.fixture
def ops() -> Iterator[tuple[OpsServer, dict[str, float | None]]]:
    state: dict[str, float | None] = {"last": None}
    readiness = Readiness("exporter").add("outbox_loop", loop_check(lambda: state["last"], 60))
    server = OpsServer(readiness, "127.0.0.1", 0).start()
    yield server, state
    server.stop()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def test_ops_server_serves_health_readiness_and_process_metrics(
    ops: tuple[OpsServer, dict[str, float | None]],
) -> None:
    import time

    server, state = ops
    base = f"http://127.0.0.1:{server.port}"
    assert get(base + "/healthz") == (200, b'{"status": "ok", "kind": "exporter"}')
    status, body = get(base + "/readyz")
    assert status == 503
    assert json.loads(body)["checks"]["outbox_loop"] == {"ok": False, "detail": "has not run yet"}
    state["last"] = time.monotonic()
    status, body = get(base + "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    metrics.INSTANCES_REJECTED.labels("invalid_uid").inc()
    status, body = get(base + "/metrics")
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }
    assert samples[("acwi_scp_instances_rejected_total", (("reason", "invalid_uid"),))] >= 1
    assert get(base + "/nothing")[0] == 404
    # HEAD, as load balancers probe: the GET's status and headers, no body (it was 501)
    for path in ("/healthz", "/readyz", "/metrics", "/nothing"):
        request = urllib.request.Request(base + path, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                status, headers, body = int(response.status), response.headers, response.read()
        except urllib.error.HTTPError as exc:
            status, headers, body = int(exc.code), exc.headers, exc.read()
        assert (status, body) == (get(base + path)[0], b""), path
        assert int(headers["Content-Length"]) > 0, path


PREFORK_SCRIPT = """
import multiprocessing, sys
from acwi_node.config import load_settings
from pathlib import Path
from acwi_node.observability import multiproc
multiproc.SHARED_MEMORY = Path(sys.argv[2])
folder = multiproc.enable_multiprocess(load_settings(None, node={"data_dir": sys.argv[1]}))
assert folder is not None and folder.parent.parent == multiproc.SHARED_MEMORY
from acwi_node.observability import metrics

def child() -> None:
    metrics.JOBS_PROCESSED.labels("analysed").inc()
    metrics.INFERENCE_SECONDS.labels("m", "1").observe(0.3)

procs = [multiprocessing.get_context("fork").Process(target=child) for _ in range(3)]
for p in procs:
    p.start()
for p in procs:
    p.join()
metrics.JOBS_PROCESSED.labels("failed").inc()
sys.stdout.write(metrics.process_metrics().decode())
"""


def test_prefork_pool_metrics_add_up_across_processes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    (tmp_path / "shm").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", PREFORK_SCRIPT, str(tmp_path / "data"), str(tmp_path / "shm")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(done.stdout)
        for s in f.samples
    }
    assert values[("acwi_worker_jobs_total", (("outcome", "analysed"),))] == 3
    assert values[("acwi_worker_jobs_total", (("outcome", "failed"),))] == 1
    assert values[("acwi_inference_seconds_count", (("model", "m"), ("version", "1")))] == 3
    # the pool's own folder, on the memory file system and not on the data disk
    assert [p.name for p in (tmp_path / "shm").glob("acwi-node-*/worker-*")]
    assert not (tmp_path / "data" / "metrics").exists()


def _node(data_dir: Path) -> Settings:
    return load_settings(None, node={"data_dir": str(data_dir)})


def test_multiprocess_metrics_are_kept_off_the_data_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prometheus_client's sparse mmapped files kill a process with SIGBUS when the file system
    they are on is full: they are on /dev/shm, in a private folder of each data directory."""
    from acwi_node.observability import multiproc

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(multiproc, "SHARED_MEMORY", shm)
    monkeypatch.setenv(multiproc.ENV, "")  # prometheus_client is loaded here already
    first = multiproc.enable_multiprocess(_node(tmp_path / "a"), "scp")
    assert first is not None and first.is_dir()
    assert first.parent.parent == shm and not (tmp_path / "a" / "metrics").exists()
    assert os.environ[multiproc.ENV] == str(first)
    assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700
    # Another data directory (another node on the host) has its own folder; the same one
    # named another way has the same.
    other = multiproc.metrics_root(_node(tmp_path / "b"))
    assert other != first.parent and other.parent == shm
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert multiproc.metrics_root(_node(tmp_path / "link")) == first.parent
    # A folder a process left (its pid used again) is emptied; a stopped one's removed.
    (first / "counter_1.db").write_bytes(b"x")
    again = multiproc.enable_multiprocess(_node(tmp_path / "a"), "scp")
    assert again == first and not list(first.iterdir())
    multiproc.disable_multiprocess(first)
    assert not first.exists() and other.is_dir()
    assert not first.parent.exists()  # the node's folder, empty, goes too
    # A folder other processes of the node still use stays.
    worker = multiproc.enable_multiprocess(_node(tmp_path / "a"), "worker")
    web = multiproc.enable_multiprocess(_node(tmp_path / "a"), "web")
    assert worker is not None and web is not None and worker.parent == web.parent
    multiproc.disable_multiprocess(web)
    assert worker.is_dir()
    multiproc.disable_multiprocess(worker)
    assert not worker.parent.exists()


def test_folders_of_processes_killed_before_they_removed_theirs_go_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed (SIGKILL, the OOM killer) never removes its folder: each restart by
    ``acwi-node serve`` left one more on the memory file system, its values added up by
    nobody. The next process of the node removes those of this host's processes that are
    gone; a running process's folder, another host's and anything else stay."""
    from acwi_node.observability import multiproc

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(multiproc, "SHARED_MEMORY", shm)
    monkeypatch.setenv(multiproc.ENV, "")  # prometheus_client is loaded here already
    monkeypatch.setattr(multiproc.socket, "gethostname", lambda: "node-1")
    root = multiproc.metrics_root(_node(tmp_path / "a"))
    gone = []
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        gone.append(child.pid)
    left = [
        root / f"{kind}-node-1-{pid}"
        for kind, pid in zip(("scp", "web", "worker"), gone, strict=True)
    ]
    kept = [
        root / f"scp-node-1-{os.getppid()}",  # running
        root / f"scp-other-node-1-{gone[0]}",  # another host's
        root / f"web-node-{gone[1]}",  # another host's ("node")
        root / "notes",
    ]
    for planted in left + kept:
        planted.mkdir()
        (planted / "counter_1.db").write_bytes(b"x" * 100)
    folder = multiproc.enable_multiprocess(_node(tmp_path / "a"), "scp")
    assert folder is not None and folder.parent == root
    assert sorted(p.name for p in root.iterdir()) == sorted([folder.name] + [p.name for p in kept])
    multiproc.disable_multiprocess(folder)


def test_multiprocess_metrics_fall_back_to_the_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from acwi_node.observability import multiproc

    node = _node(tmp_path / "data")
    monkeypatch.setattr(multiproc, "SHARED_MEMORY", tmp_path / "missing")
    assert multiproc.metrics_root(node) == tmp_path / "data" / "metrics"
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(multiproc, "SHARED_MEMORY", shm)
    shm.chmod(0o500)  # not writable
    try:
        if not os.access(shm, os.W_OK):  # (root may write anyway)
            assert multiproc.metrics_root(node) == tmp_path / "data" / "metrics"
    finally:
        shm.chmod(0o700)
    # A name someone else planted there (a link to elsewhere) is not used.
    expected = multiproc.metrics_root(node)
    expected.rmdir()
    expected.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    assert multiproc.metrics_root(node) == tmp_path / "data" / "metrics"
    # A folder of this user's with a wider mode is made private.
    expected.unlink()
    expected.mkdir(mode=0o755)
    expected.chmod(0o755)
    assert multiproc.metrics_root(node) == expected
    assert stat.S_IMODE(expected.stat().st_mode) == 0o700


def test_multiprocess_metrics_use_dev_shm_where_it_is_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from acwi_node.observability import multiproc

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        pytest.skip("no writable /dev/shm here")
    monkeypatch.setenv(multiproc.ENV, "")  # prometheus_client is loaded here already
    folder = multiproc.enable_multiprocess(_node(tmp_path), "web")
    assert folder is not None
    try:
        assert folder.parent.parent == shm
        assert folder.parent.name.startswith(f"acwi-node-{os.getuid()}-")
    finally:
        multiproc.disable_multiprocess(folder)
    assert not folder.exists() and not folder.parent.exists()


ALERT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "acwi-alerts.yml"


def _exported_names(settings: Settings, ledger: Ledger) -> set[str]:
    """Every sample name a scrape of the node's processes can show (families whose labelled
    children do not exist yet included)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {"up"}  # Prometheus' own per-target series
    for family in REGISTRY.collect():
        if family.name.startswith("acwi_"):
            names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    for family in metrics.LedgerCollector(settings, ledger).collect():
        names.add(family.name)
    return names


def test_alert_rules_name_only_metrics_the_node_exports(settings: Settings, ledger: Ledger) -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it is in the dev extras)")
    rules = [r for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]]
    assert len(rules) >= 8
    exported = _exported_names(settings, ledger)
    for rule in rules:
        assert rule["alert"].startswith("Acwi") and rule["annotations"]["summary"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        used = set(re.findall(r"\b(acwi_[a-z0-9_]+|up)\b(?=\s*[{\[=<>/)]|\s*$)", rule["expr"]))
        assert used, rule["expr"]
        assert used <= exported, f"{rule['alert']}: {used - exported} is not exported"
    # The rules watch what matters most: the ledger, the disk, and failures.
    alerts = {r["alert"] for r in rules}
    assert {"AcwiLedgerDown", "AcwiDataDiskLow", "AcwiStudiesFailing"} <= alerts


OBSERVABILITY_GUIDE = ALERT_RULES.parents[2] / "docs" / "observability.md"


def test_every_metric_the_node_exports_is_documented(settings: Settings, ledger: Ledger) -> None:
    """docs/observability.md has a row for each metric family (counters with ``_total``,
    histograms by their name) with the family's labels, and names no metric the node does
    not export."""
    from prometheus_client import Counter, Gauge, Histogram

    labels: dict[str, set[str]] = {}
    for family in vars(metrics).values():
        if isinstance(family, (Counter, Gauge, Histogram)):
            name = family._name + ("_total" if isinstance(family, Counter) else "")
            labels[name] = set(family._labelnames)
    for collected in metrics.LedgerCollector(settings, ledger).collect():
        labels[collected.name] = set(getattr(collected, "_labelnames", ()))
    assert len(labels) >= 40
    documented: dict[str, set[str]] = {}
    for row in OBSERVABILITY_GUIDE.read_text().splitlines():
        cells = row.strip("|").split("|")
        if row.startswith("| `acwi_") and len(cells) >= 4:  # metric | type or process | labels
            for name in re.findall(r"`(acwi_[a-z0-9_]+)`", cells[0]):
                documented[name] = set(re.findall(r"`([a-z_]+)`", cells[2]))
    assert sorted(set(labels) - set(documented)) == []
    assert sorted(set(documented) - set(labels)) == []
    assert {n: sorted(ls) for n, ls in documented.items() if ls != labels[n]} == {}


def test_every_alert_is_named_in_the_observability_guide() -> None:
    """An alert that fires is looked up by its name: docs/observability.md names each rule."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it is in the dev extras)")
    rules = [r for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]]
    named = set(re.findall(r"`(Acwi[A-Za-z]+)`", OBSERVABILITY_GUIDE.read_text()))
    assert sorted({r["alert"] for r in rules} - named) == []


GRAFANA_DASHBOARD = ALERT_RULES.parents[1] / "grafana" / "acwi-node.json"


def test_the_grafana_dashboard_names_only_metrics_the_node_exports(
    settings: Settings, ledger: Ledger
) -> None:
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exported = _exported_names(settings, ledger)
    covered: set[str] = set()
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["title"], panel
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\bacwi_[a-z0-9_]+\b", target["expr"]))
            assert used, target["expr"]
            assert used <= exported, f"{panel['title']}: {used - exported} is not exported"
            covered |= used
    # The panels cover every stage a study goes through.
    for metric in (
        "acwi_scp_instances_received_total",
        "acwi_inference_seconds_bucket",
        "acwi_deliveries",
        "acwi_data_free_bytes",
    ):
        assert metric in covered, metric


#: Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"job", "instance"}


def _exported_labels(settings: Settings, ledger: Ledger) -> dict[str, set[str]]:
    """Each sample name a scrape can show, with the labels its series carry."""
    from prometheus_client import Counter, Gauge, Histogram

    labels: dict[str, set[str]] = {"up": set()}
    for family in vars(metrics).values():
        if isinstance(family, Counter):
            labels[family._name + "_total"] = set(family._labelnames)
        elif isinstance(family, Histogram):
            for suffix in ("_bucket", "_sum", "_count"):
                labels[family._name + suffix] = set(family._labelnames)
            labels[family._name + "_bucket"].add("le")
        elif isinstance(family, Gauge):
            labels[family._name] = set(family._labelnames)
    for collected in metrics.LedgerCollector(settings, ledger).collect():
        found = labels.setdefault(collected.name, set(getattr(collected, "_labelnames", ())))
        for sample in collected.samples:
            found |= set(sample.labels)
    return labels


def label_problems(expr: str, labels: dict[str, set[str]], uses: str = "") -> list[str]:
    """Labels a PromQL expression (and the ``{{ $labels.x }}`` of its annotations or legend,
    ``uses``) names that its metrics do not carry, or that its aggregation drops."""
    problems: list[str] = []
    names = set(re.findall(r"\b(acwi_[a-z0-9_]+|up)\b(?=\s*[{\[)=<>/ ]|\s*$)", expr))
    for name, matchers in re.findall(r"\b(acwi_[a-z0-9_]+|up)\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            if label not in labels.get(name, set()) | TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
    carried = set().union(*(labels.get(n, set()) for n in names)) | TARGET_LABELS
    grouped = [
        {label.strip() for label in group.split(",") if label.strip()}
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr)
    ]
    for group in grouped:
        problems += [f"by ({label}): not a label of {sorted(names)}" for label in group - carried]
    # The outermost aggregation comes first; one without `by` keeps no label at all.
    aggregated = re.search(r"\b(sum|max|min|avg|count|group)\s*\(", expr)
    kept = grouped[0] if grouped else set() if aggregated else carried
    for label in set(re.findall(r"\$labels\.(\w+)", uses)) - kept:
        problems.append(f"$labels.{label}: the expression does not keep it")
    return problems


def test_label_problems_are_found() -> None:
    labels = {"acwi_deliveries": {"destination", "state"}}
    assert label_problems('sum by (destination) (acwi_deliveries{state="x"})', labels, "") == []
    assert label_problems(
        'sum by (route) (acwi_deliveries{stat="x"})', labels, "{{ $labels.destination }}"
    ) == [
        "acwi_deliveries has no label stat",
        "by (route): not a label of ['acwi_deliveries']",
        "$labels.destination: the expression does not keep it",
    ]
    assert label_problems("max(acwi_deliveries)", labels, "{{ $labels.destination }}") == [
        "$labels.destination: the expression does not keep it"
    ]


def test_alerts_and_dashboard_use_the_labels_the_metrics_carry(
    settings: Settings, ledger: Ledger
) -> None:
    """A label matcher on a label the metric lacks matches nothing (an alert that never fires,
    a panel that stays empty); an annotation naming a label the aggregation dropped is empty."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it is in the dev extras)")
    labels = _exported_labels(settings, ledger)
    problems: list[str] = []
    for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]:
        for rule in group["rules"]:
            uses = json.dumps(rule.get("annotations", {}))
            problems += [
                f"{rule['alert']}: {p}" for p in label_problems(rule["expr"], labels, uses)
            ]
    for panel in json.loads(GRAFANA_DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            legend = re.sub(r"\{\{\s*(\w+)\s*\}\}", r"$labels.\1", target.get("legendFormat", ""))
            found = label_problems(target["expr"], labels, legend)
            problems += [f"{panel['title']}: {p}" for p in found]
    assert problems == []


def test_a_check_that_raises_says_its_error_type_and_logs_the_message_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ledger that cannot be reached: /readyz (which answers anyone) names the error's type,
    not the driver's message with the database's host, port and name; the log has the
    message, once while it stays the same, again when it changes."""
    from acwi_node.observability.health import Readiness

    errors = iter(
        [
            'connection to server at "10.9.8.7", port 5433 failed: Connection refused',
            'connection to server at "10.9.8.7", port 5433 failed: Connection refused',
            'FATAL: database "acwi_secret" does not exist',
        ]
    )

    def ledger() -> tuple[bool, str]:
        raise RuntimeError(next(errors))

    readiness = Readiness("web").add("ledger", ledger)
    with caplog.at_level(logging.WARNING, logger="acwi_node.health"):
        bodies = [json.dumps(readiness.evaluate()) for _ in range(3)]
    for body in bodies:
        assert '"ok": false' in body and "RuntimeError" in body
        assert "10.9.8.7" not in body and "5433" not in body and "acwi_secret" not in body
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and "10.9.8.7" in logged[0] and "acwi_secret" in logged[1]


def test_a_readiness_check_that_does_not_answer_is_not_ok_and_not_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ledger that does not answer (its server gone without a reset) holds its check: the
    probe answers not ready without it, and the next probe does not pile up another."""
    import threading

    answer = threading.Event()
    calls: list[str] = []

    def ledger() -> tuple[bool, str]:
        calls.append("ledger")
        answer.wait()
        return True, "reachable"

    readiness = Readiness("web", timeout_s=0.01).add("ledger", ledger)
    readiness.add("broker", lambda: (True, "embedded"))
    with caplog.at_level(logging.WARNING, logger="acwi_node.health"):
        probes = [readiness.evaluate() for _ in range(3)]
    for ready, body in probes:
        assert not ready
        assert body["checks"]["ledger"]["ok"] is False
        assert body["checks"]["ledger"]["detail"].startswith("no answer for ")
        assert body["checks"]["broker"] == {"ok": True, "detail": "embedded"}
    assert calls == ["ledger"]
    assert [r.getMessage() for r in caplog.records] == [
        "readiness check ledger has not answered in 0.01 s"
    ]
    answer.set()
    readiness._running["ledger"].thread.join()
    assert readiness.evaluate()[0]
