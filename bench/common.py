"""Shared helpers of the benchmark scripts: statistics, test data, DCMTK and node processes.

The scripts run from the repository root (``python -m bench.ingest``); they start every server
they measure on free loopback ports in temporary directories and stop it afterwards.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from acwi_node.ingest.cpu_latency import CpuLatencyRequest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


# ------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    if lo == hi:
        return float(ordered[lo])
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n, mean, p50, p95, min and max of ``values``."""
    return {
        "n": float(len(values)),
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; NaN when the denominator is zero."""
    return numerator / denominator if denominator else math.nan


def rate(count: int, seconds: float) -> float:
    """Items per second."""
    return ratio(float(count), seconds)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats with two decimals."""

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")


# ------------------------------------------------------------------------- test data
def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def ct_slice(
    study_uid: str,
    series_uid: str,
    index: int,
    *,
    size: int = 512,
    seed: int = 0,
    frame_of_reference_uid: str | None = None,
) -> Dataset:
    """One CT-like axial slice: 16-bit signed HU phantom (a body ellipse, lungs, noise), in
    ``frame_of_reference_uid`` (the series'; a new one if not given)."""
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(CT_STORAGE, sop_uid)
    ds.SOPClassUID = CT_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid()
    ds.PatientName = "BENCH^CT"
    ds.PatientID = "BENCH0001"
    ds.AccessionNumber = "BENCHCT"
    ds.StudyDate = ds.SeriesDate = "20240101"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "ACWI Bench"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = 1.0
    ds.ImagePositionPatient = [-170.0, -170.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.68, 0.68]
    ds.KVP = 120
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    hu = np.full((size, size), -1000.0)
    hu[(xx / 0.42) ** 2 + (yy / 0.32) ** 2 < 1] = 40.0
    for cx in (-0.18, 0.18):
        hu[((xx - cx) / 0.14) ** 2 + (yy / 0.22) ** 2 < 1] = -850.0
    hu += rng.normal(0, 12, hu.shape)
    ds.PixelData = np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()
    return ds


def write_ct_series(out_dir: Path, n_slices: int, *, size: int = 512, seed: int = 0) -> list[Path]:
    """A CT-like series of ``n_slices`` slices (one new study, one frame of reference, as a
    scanner's axial series has); returns the file paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(n_slices):
        path = out_dir / f"CT{i + 1:05d}.dcm"
        ct_slice(
            study_uid, series_uid, i, size=size, seed=seed, frame_of_reference_uid=frame_uid
        ).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_small_instances(out_dir: Path, n: int, *, per_study: int = 50) -> list[Path]:
    """``n`` small secondary-capture instances (16x16, 8-bit), ``per_study`` per study."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    study_uid = series_uid = ""
    pixels = np.arange(256, dtype=np.uint8).tobytes()
    for i in range(n):
        if i % per_study == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
        sop_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = _file_meta(SC_STORAGE, sop_uid)
        ds.SOPClassUID = SC_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientName = "BENCH^SMALL"
        ds.PatientID = "BENCH0002"
        ds.Modality = "OT"
        ds.ConversionType = "WSD"
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = pixels
        path = out_dir / f"SC{i + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------- CPU time
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def spool_and_record(ledger: Any, spool: Any, path: Path, *, first: bool) -> Any:
    """Store a synthetic CT file (:func:`write_ct_series`) in ``spool`` and record it in
    ``ledger`` as the SCP would (calling AE ``BENCH``, body part CHEST), for the benches that
    run the worker in-process; returns the ledger's row. ``first``: the first of its
    association. The node's modules are imported here: the other benches do not need them."""
    import pydicom

    from acwi_node.ledger import InstanceRecord

    data = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    stored = spool.store(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), data)
    return ledger.record_instance(
        InstanceRecord(
            study_uid=str(ds.StudyInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            series_uid=str(ds.SeriesInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            modality="CT",
            body_part="CHEST",
            path=spool.relative(stored),
            size=len(data),
            calling_ae="BENCH",
        ),
        first_in_association=first,
    )


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                out += [int(c) for c in handle.read().split()]
        except OSError:
            continue
    return out


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its live descendants,
    and by the descendants that ended and were waited for (``storescp --fork``'s children, one
    per association; Linux ``/proc``; 0.0 where that cannot be read)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # Fields after the command name, from "state" (field 3): utime is 14, stime 15, and
        # the waited-for children's cutime 16, cstime 17. A live child is not in its parent's
        # cutime until it is waited for, and then it is no longer live: nothing counts twice.
        total += sum(int(f) for f in fields[11:15]) / _CLOCK_TICKS
        pending += _children(current)
    return total


def children_cpu_s() -> float:
    """CPU seconds used by this process's ended and waited-for children (the senders)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------- the machine
@contextmanager
def cpu_wakeup_latency(microseconds: int | None) -> Iterator[None]:
    """Hold a PM QoS request that CPUs wake within ``microseconds`` (0: never leave the
    polling idle state) for the block, as a latency tuning profile (``tuned-adm profile
    latency-performance``) does, and as the node's ``ingest.cpu_wakeup_latency_us`` does
    while associations are open; ``None``: leave the machine as it is. Needs root."""
    if microseconds is None:
        yield
        return
    request = CpuLatencyRequest(microseconds)
    request.acquire()
    if not request.held:
        raise SystemExit(f"cannot request a CPU wake-up latency ({request.device})")
    try:
        yield
    finally:
        request.close()


def available_memory_bytes() -> int:
    """The kernel's estimate of memory available without swapping (``MemAvailable``); 0 where
    it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def prefault_memory(size: int) -> int:
    """Touch ``size`` bytes of fresh anonymous memory (at most half of what is available),
    then give them back; the bytes touched.

    On a virtual machine whose free memory the guest reports to the host (virtio-balloon free
    page reporting: blocks of 128 KiB and more, here as soon as they are free), memory once
    freed is no longer backed: the next program to use it pays a fault in the host for every
    page, 11-18 us per 4 KiB page here. Dropping the page cache before a measurement frees
    hundreds of MiB, and the next target to write its instances took those faults (a node
    writing each CT slice twice, into its journal and its spool file, took twice as many as
    storescp): 400 CT slices into the node 271-764 per second from round to round, up to 1.6
    ms of system time a slice, most of it copying into fresh page cache pages. Touched here, a
    pool of memory is backed again for the next pages the kernel hands out."""
    size = min(size, available_memory_bytes() // 2)
    page = mmap.PAGESIZE
    size -= size % page
    if size <= 0:
        return 0
    memory = mmap.mmap(-1, size)
    try:
        populate = getattr(mmap, "MADV_POPULATE_WRITE", None)
        try:
            if populate is None:
                raise OSError("MADV_POPULATE_WRITE is not available")
            memory.madvise(populate)
        except OSError:  # kernels before 5.14: a write to each page
            for offset in range(0, size, page):
                memory[offset] = 1
    finally:
        memory.close()
    return size


def flush_latency_us(directory: Path, size: int, *, records: int = 1000) -> float:
    """Median microseconds of writing ``size`` bytes into a preallocated file in ``directory``
    and flushing them (``pwrite`` + ``fdatasync``), as the node's ingest journal does for each
    instance: what a receiver that flushes an instance before it answers adds to it, at least.
    At most ``records`` writes, fewer where ``size`` is large (64 MiB in all)."""
    stride = -(-max(size, 1) // 4096) * 4096
    records = max(1, min(records, (64 << 20) // stride))
    path = directory / f"flush-probe-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, bytes(records * stride))
        os.fsync(fd)
        record = os.urandom(size)
        times = []
        for i in range(records):
            start = time.perf_counter()
            os.pwrite(fd, record, i * stride)
            os.fdatasync(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    return 1e6 * statistics.median(times)


# ------------------------------------------------------------------------- DCMTK
#: Whether DCMTK's tools get ``TCP_NODELAY=1`` (``bench.ingest --nagle`` turns it off).
SENDERS_NODELAY = True


def dcmtk_env() -> dict[str, str]:
    """The environment of a DCMTK tool: ``TCP_NODELAY=1`` (each PDU sent at once), unless
    :data:`SENDERS_NODELAY` is off (Nagle's algorithm, as DCMTK is installed)."""
    if SENDERS_NODELAY:
        return {**os.environ, "TCP_NODELAY": "1"}
    return {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}


def storescu_cmd(
    port: int, files: Sequence[Path], *, called: str, calling: str = "BENCHSCU"
) -> list[str]:
    """DCMTK storescu sending ``files`` over one association (explicit little endian)."""
    return [
        str(STORESCU),
        "-xe",
        "-aet",
        calling,
        "-aec",
        called,
        "-to",
        "60",
        "-ta",
        "60",
        "-td",
        "120",
        "127.0.0.1",
        str(port),
        *[str(f) for f in files],
    ]


def send_parallel(port: int, files: Sequence[Path], *, called: str, associations: int = 1) -> float:
    """Send ``files`` split over ``associations`` concurrent storescu processes; seconds taken."""
    chunks = [list(files[i::associations]) for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            storescu_cmd(port, chunk, called=called),
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for chunk in chunks
        if chunk
    ]
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    elapsed = time.perf_counter() - start
    for proc, out in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed ({proc.returncode}): {out.decode()[-2000:]}")
    return elapsed


def send_each(port: int, files: Sequence[Path], *, called: str) -> float:
    """Send each file in its own association (one storescu after another), as a modality
    sending each image as it is made does; seconds taken."""
    start = time.perf_counter()
    for path in files:
        proc = subprocess.run(
            storescu_cmd(port, [path], called=called),
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"storescu failed ({proc.returncode}): {proc.stdout.decode()[-2000:]}"
            )
    return time.perf_counter() - start


def wait_port(port: int, timeout_s: float = 60.0) -> None:
    from tests.support.node import wait_port as _wait

    _wait("127.0.0.1", port, timeout_s)


def node_env(config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACWI_")}
    env.update({"ACWI_CONFIG": str(config), "PYTHONUNBUFFERED": "1"})
    return env


def start_node(config: Path, kind: str, log: Path) -> subprocess.Popen[bytes]:
    """``acwi-node <kind>`` with ``config``, in its own session, output to ``log``."""
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "acwi_node.cli", kind],
            env=node_env(config),
            cwd=config.parent,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM to the process group, then SIGKILL if it does not end."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
