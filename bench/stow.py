"""STOW-RS ingest: Orthanc's DICOMweb plugin and the node's ``/dicomweb/studies`` take the same
instances, side by side.

    python -m bench.stow                         # 200 CT slices + 1,000 small instances
    python -m bench.stow --ct 50 --small 200     # a quick run
    python -m bench.stow --per-request 50 --repeat 3 --json stow.json
    python -m bench.stow --connections 4         # four connections sending at once
    python -m bench.stow --connections 4 --web-workers 2   # the node's web in two processes

The same Part 10 files go to each target in ``multipart/related; type="application/dicom"``
requests of ``--per-request`` objects, one request at a time on one keep-alive connection (as a
PACS's DICOMweb client sends a study; ``--connections N``: N such connections at once, each an
even share of the objects), with HTTP Basic credentials. Orthanc (1.7.4 and later)
fsyncs each file it stores; the node flushes each object's spool file and ledger row before
its answer (:mod:`acwi_node.ingest.stow`). With ``--repeat N`` the targets run in N rounds of
alternating order; the table gives medians and the node's ratio to Orthanc (median of the
ratios within a round). Every target starts empty; the run checks that every object is in the
node's spool and ledger, and that every answer was 200.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    markdown_table,
    rate,
    ratio,
    start_node,
    stop_process,
    wait_port,
    write_ct_series,
    write_json,
    write_small_instances,
)
from bench.ingest import ledger_instances
from tests.support.node import add_api_user, write_config
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port

USER = ("bench-stow", "bench-stow-password")


@dataclass
class Service:
    port: int
    path: str  # the DICOMweb base path
    count: Callable[[], int]


def request_bodies(files: Sequence[Path], per_request: int) -> list[tuple[str, bytes]]:
    """(boundary, body) of each request of ``per_request`` objects."""
    bodies = []
    for start in range(0, len(files), per_request):
        boundary = secrets.token_hex(16)
        body = b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + f.read_bytes()
            + b"\r\n"
            for f in files[start : start + per_request]
        )
        bodies.append((boundary, body + f"--{boundary}--\r\n".encode()))
    return bodies


def post_all(service: Service, files: Sequence[Path], per_request: int) -> float:
    """Seconds to store ``files`` in requests of ``per_request`` objects on one connection."""
    return post_bodies(service, request_bodies(files, per_request))


def post_parallel(
    service: Service, files: Sequence[Path], per_request: int, connections: int
) -> float:
    """Seconds to store ``files`` split evenly over ``connections`` connections at once, each
    sending its share in requests of ``per_request`` objects, one after another."""
    if connections <= 1:
        return post_all(service, files, per_request)
    share = -(-len(files) // connections)
    bodies = [
        request_bodies(files[i : i + share], per_request) for i in range(0, len(files), share)
    ]
    errors: list[BaseException] = []

    def send(these: list[tuple[str, bytes]]) -> None:
        try:
            post_bodies(service, these)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    if errors:
        raise errors[0]
    return seconds


def post_bodies(service: Service, bodies: Sequence[tuple[str, bytes]]) -> float:
    """Seconds to post ``bodies`` one after another on one keep-alive connection."""
    auth = base64.b64encode(":".join(USER).encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=600)
    began = time.perf_counter()
    for boundary, body in bodies:
        conn.request(
            "POST",
            f"{service.path}/studies",
            body=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
                "Authorization": f"Basic {auth}",
            },
        )
        response = conn.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {answer[:300]!r}")
    seconds = time.perf_counter() - began
    conn.close()
    return seconds


@contextmanager
def orthanc_target(workdir: Path) -> Iterator[Service]:
    with OrthancServer(node_port=free_port(), workdir=workdir / "orthanc", http_user=USER) as o:
        o.require_dicomweb()
        yield Service(
            o.http_port, "/dicom-web", lambda: int(o.get_json("/statistics")["CountInstances"])
        )


#: ``node.http_workers`` of the node target (``--web-workers``).
NODE_HTTP_WORKERS = 1


@contextmanager
def node_target(workdir: Path) -> Iterator[Service]:
    root = workdir / "node"
    root.mkdir()
    port = free_port()
    config = write_config(
        root / "acwi-node.toml",
        {
            "node": {
                "ae_title": "ACWI",
                "dicom_port": free_port(),
                "http_port": port,
                "http_workers": NODE_HTTP_WORKERS,
                "data_dir": str(root / "data"),
                "log_level": "WARNING",
            }
        },
    )
    add_api_user(config, USER, role="sender")
    proc = start_node(config, "web", root / "web.log")
    try:
        wait_port(port)
        ledger_url = f"sqlite:///{root / 'data' / 'ledger.sqlite'}"

        def count() -> int:
            spooled = sum(1 for _ in (root / "data" / "spool").glob("*/*.dcm"))
            return min(spooled, ledger_instances(ledger_url))

        yield Service(port, "/dicomweb", count)
    finally:
        stop_process(proc)


TARGETS: dict[str, Callable[[Path], AbstractContextManager[Service]]] = {
    "orthanc": orthanc_target,
    "node": node_target,
}


def measure(
    name: str, files: list[Path], per_request: int, workdir: Path, connections: int = 1
) -> float:
    """Instances per second into a fresh target; checks every one arrived."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))  # kept until the end (see bench.ingest)
    with TARGETS[name](run_dir) as service:
        seconds = post_parallel(service, files, per_request, connections)
        stored = service.count()
        if stored != len(files):
            raise RuntimeError(f"{name}: {stored} of {len(files)} instances stored")
    return rate(len(files), seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=200, help="CT slices (512x512)")
    parser.add_argument("--small", type=int, default=1000, help="small instances")
    parser.add_argument("--per-request", type=int, default=50, help="objects per request")
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="connections sending at once, each an even share of the objects (default 1)",
    )
    parser.add_argument(
        "--web-workers",
        type=int,
        default=1,
        help="the node's web processes (node.http_workers; 0: one per core); default 1",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of alternating order")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    global NODE_HTTP_WORKERS
    NODE_HTTP_WORKERS = args.web_workers
    results: list[dict[str, Any]] = []
    rows = []
    with tempfile.TemporaryDirectory(prefix="acwi-bench-stow-") as tmp:
        work = Path(tmp)
        sets: dict[str, list[Path]] = {}
        if args.ct:
            sets[f"{args.ct} CT 512x512x16"] = write_ct_series(work / "ct", args.ct)
        if args.small:
            sets[f"{args.small} small"] = write_small_instances(work / "small", args.small)
        for label, files in sets.items():
            rounds: list[dict[str, float]] = []
            for r in range(args.repeat):
                order = list(TARGETS) if r % 2 == 0 else list(reversed(TARGETS))
                measured = {}
                for name in order:
                    measured[name] = measure(name, files, args.per_request, work, args.connections)
                    print(f"{label:24s} {name:8s} {measured[name]:8.1f} inst/s", flush=True)
                rounds.append(measured)
            orthanc = statistics.median(m["orthanc"] for m in rounds)
            node = statistics.median(m["node"] for m in rounds)
            node_ratio = statistics.median(ratio(m["node"], m["orthanc"]) for m in rounds)
            shown = label if args.connections == 1 else f"{label}, {args.connections} connections"
            rows.append([shown, orthanc, node, node_ratio])
            results.append({"set": label, "rounds": rounds})
    print()
    print(
        markdown_table(
            ["instances", "Orthanc STOW-RS inst/s", "node STOW-RS inst/s", "node / Orthanc"], rows
        )
    )
    write_json(
        args.json, {"benchmark": "stow", "args": vars(args) | {"json": None}, "results": results}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
