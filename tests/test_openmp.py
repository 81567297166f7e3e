"""openmp.release_pool: a thread gives its OpenMP helper threads up (so a worker thread's pool is the
only one) and, with serial=True, makes no new pool. Run in a subprocess: it changes the threads of
the process it runs in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adaspec.models.openmp import _libgomp

SCRIPT = r"""
import json, os, threading
import torch
from adaspec.models.openmp import release_pool

def threads():
    return len(os.listdir("/proc/self/task"))

def work():
    x = torch.randn(512, 512)
    for _ in range(20):
        x = torch.tanh(x @ x) * 0.5  # parallel regions on 2 OpenMP threads

torch.set_num_threads(2)
out = {"before": threads()}
work()
out["with_pool"] = threads()
out["released"] = release_pool(serial=True)
out["after_release"] = threads()
work()
out["after_more_work"] = threads()
out["main_threads"] = torch.get_num_threads()

def other():
    work()
    out["other_thread_threads"] = torch.get_num_threads()
    out["while_other_works"] = threads()

t = threading.Thread(target=other); t.start(); t.join()
print(json.dumps(out))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/task")
def test_release_pool_frees_the_helpers_and_the_thread_stays_serial():
    import torch

    torch.ones(2).sum()
    if _libgomp() is None:
        pytest.skip("this torch does not run on GNU OpenMP")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["released"] is True
    assert out["with_pool"] == out["before"] + 1  # one helper thread next to the main thread
    assert out["after_release"] == out["before"]  # the helper is gone
    assert out["after_more_work"] == out["before"] and out["main_threads"] == 1  # and none comes back
    # another thread still gets its own pool of two
    assert out["other_thread_threads"] == 2 and out["while_other_works"] == out["before"] + 2


def test_release_pool_says_when_there_is_nothing_to_release(monkeypatch):
    import adaspec.models.openmp as openmp

    monkeypatch.setattr(openmp, "_libgomp", lambda: None)
    assert openmp.release_pool(serial=True) is False
