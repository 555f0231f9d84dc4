"""What the node's model monitoring would say of a model, site by site, before it ships.

``acwi-models monitor-sites --model DIR`` analyses phantom studies (one radiograph each) from
a baseline site, then as many from each site asked for, with the node's own analyser, and
reads each site's studies against the baseline's with the node's monitoring
(:func:`acwi_node.monitoring.report.compare`, its default thresholds): the rates, the score
distributions, the predicted labels and the equipment. The baseline site again, with other
seeds, is the check of false alarms: it should read stable. A site that reads shifted only on
its equipment is one the model takes in its stride; one whose scores or rates shift is one to
look at before the node meets it.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from acwi_node.config import MonitoringSettings
from acwi_node.inference.analyser import Analyser
from acwi_node.monitoring.drift import Status
from acwi_node.monitoring.report import Sample, SignalResult, compare, sample_of, worst
from acwi_node.tasks.analyse import equipment_of, summarise
from models.data.synth import LABELS, SITES, write_study


@dataclass(frozen=True)
class SiteReading:
    site: int
    equipment: str
    studies: int
    status: Status
    signals: list[SignalResult]

    def as_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "equipment": self.equipment,
            "studies": self.studies,
            "status": self.status.value,
            "signals": {
                s.signal: {
                    "status": s.status.value,
                    "statistic": None if s.statistic is None else round(s.statistic, 4),
                    "p_value": None if s.p_value is None else float(f"{s.p_value:.3g}"),
                    "baseline": s.baseline_text,
                    "recent": s.recent_text,
                }
                for s in self.signals
            },
        }


def site_samples(
    analyser: Analyser, work: Path, site: int, studies: int, first_seed: int, size: int
) -> list[Sample]:
    """``studies`` one-image phantom studies of ``site`` (labels in turn), analysed, as the
    monitoring samples of their summaries."""
    samples = []
    at = dt.datetime(2026, 1, 1)
    threshold = analyser.manifest.uncertainty_threshold
    for i in range(studies):
        seed = first_seed + i
        (path,) = write_study(
            work / f"site{site}-{seed}", n_images=1, label=LABELS[seed % len(LABELS)],
            site=site, seed=seed, size=size, accession_number=f"M{seed}",
        )  # fmt: skip
        ds = pydicom.dcmread(path)
        analysis = analyser.analyse([ds])
        summary = summarise(
            analysis,
            threshold,
            ood_threshold=analyser.manifest.ood.threshold,
            equipment=equipment_of([ds]),
        )
        sample = sample_of(seed, analyser.manifest.name, at, summary, "PACS")
        assert sample is not None
        samples.append(sample)
    return samples


def monitor_sites(
    analyser: Analyser,
    *,
    baseline_site: int = 0,
    sites: list[int] | None = None,
    studies: int = 100,
    size: int = 128,
    work: Path | None = None,
) -> list[SiteReading]:
    """Each of ``sites`` (default every phantom site, the baseline's included) read against
    ``studies`` studies of ``baseline_site``."""
    sites = list(range(len(SITES))) if sites is None else sites
    cfg = MonitoringSettings(
        baseline_studies=max(studies, 10), min_studies=min(30, max(studies, 5))
    )
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        folder = Path(tmp)
        baseline = site_samples(analyser, folder, baseline_site, studies, 10_000, size)
        out = []
        for n, site in enumerate(sites, start=1):
            recent = site_samples(analyser, folder, site, studies, 10_000 + n * 1000, size)
            signals = compare(baseline, recent, cfg)
            profile = SITES[site]
            out.append(
                SiteReading(
                    site,
                    f"{profile.manufacturer} {profile.model_name}",
                    len(recent),
                    worst(signals),
                    signals,
                )  # fmt: skip
            )
    return out


def format_readings(readings: list[SiteReading], baseline_site: int) -> str:
    """A Markdown table: per site, each signal's status and statistic."""
    names = [s.signal for s in readings[0].signals] if readings else []
    head = "| site | equipment | " + " | ".join(names) + " | overall |"
    rule = "|---|---|" + "---|" * len(names) + "---|"
    lines = [f"baseline: site {baseline_site}", "", head, rule]
    for r in readings:
        cells = []
        for s in r.signals:
            stat = "-" if s.statistic is None else f"{s.statistic:.2f}"
            cells.append(f"{s.status.value} ({stat})")
        lines.append(
            f"| {r.site} | {r.equipment} | " + " | ".join(cells) + f" | {r.status.value} |"
        )
    return "\n".join(lines)
