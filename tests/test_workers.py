"""Worker signal handling (cctr.workers), shared by `table1 --jobs` and `sweep --jobs`."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os, signal
from cctr import workers
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, workers.raise_interrupt)
# Ctrl-C reaches a worker and its parent, which then sends SIGTERM: both arrive before Python runs a handler
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
os.kill(os.getpid(), signal.SIGINT)
os.kill(os.getpid(), signal.SIGTERM)
try:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    for _ in range(1000):
        pass
except KeyboardInterrupt:
    os.kill(os.getpid(), signal.SIGTERM)  # a third signal during the cleanup is absorbed too
    print("interrupted once")
"""


def test_signals_arriving_together_interrupt_once_without_a_traceback():
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "interrupted once"
    assert "Traceback" not in p.stderr
