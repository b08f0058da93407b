"""Resident-memory measurements for the CLI: the process's peak (getrusage) and the peak within a
phase (a psutil sampler thread, so two fine-tunes in one process get separate numbers)."""
import resource
import sys
import threading

import psutil


def peak_rss_bytes():
    """The process's peak resident set size so far (bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PhasePeak:
    """with PhasePeak() as p: ...  then p.peak (bytes): the highest RSS sampled inside the block
    (every `interval` seconds), p.start: the RSS when it began."""

    def __init__(self, interval=0.02):
        self.interval, self._proc = interval, psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        self.start = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return False
