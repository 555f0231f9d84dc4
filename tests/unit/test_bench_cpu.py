"""bench.common's CPU accounting: a process tree's CPU time, children included."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bench.common import children_cpu_s, process_tree_cpu_s

#: Python code that spends 0.3 s of CPU time.
_BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"


@contextmanager
def parent_of(child: str) -> Iterator[int]:
    """A Python process that runs ``child`` (a statement starting or running a child process),
    says so and sleeps: its PID, once it has said so."""
    script = f"import subprocess, sys, time\n{child}\nprint('ready', flush=True)\ntime.sleep(5)\n"
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        yield parent.pid
    finally:
        parent.kill()
        parent.wait()


def test_a_process_tree_counts_its_live_children() -> None:
    """A parent that sleeps while its child burns CPU: the tree's time grows by the child's."""
    child = f"child = subprocess.Popen([sys.executable, '-c', {_BURN + 'time.sleep(5)'!r}])"
    with parent_of(child) as pid:
        goal = process_tree_cpu_s(pid) + 0.25
        deadline = time.monotonic() + 10
        while process_tree_cpu_s(pid) < goal and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_tree_cpu_s(pid) >= goal


def test_a_process_tree_counts_the_children_it_waited_for() -> None:
    """A parent whose child burned CPU and ended (as ``storescp --fork``'s do after each
    association): the child's time stays in the tree's once the parent has waited for it."""
    with parent_of(f"subprocess.run([sys.executable, '-c', {_BURN!r}], check=True)") as pid:
        assert process_tree_cpu_s(pid) >= 0.25


def test_an_ended_process_counts_nothing() -> None:
    assert process_tree_cpu_s(2**22 + 1) == 0.0  # above Linux's largest PID


def test_waited_children_count_for_the_senders() -> None:
    before = children_cpu_s()
    subprocess.run([sys.executable, "-c", _BURN], check=True)
    assert children_cpu_s() - before >= 0.25
