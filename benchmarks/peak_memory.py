"""Peak memory and wall time of a block: sampled process RSS on CPU, the allocator's peak on CUDA."""

import gc
import threading
import time

import torch


class PeakMemory:
    """
    While open, tracks the peak memory: `peak` is the absolute peak (process RSS on CPU, allocated bytes on CUDA),
    `peak_above_start` the peak above the level at entry; `seconds` is the wall time of the block.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._running = False

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self.peak = self._rss()
            self._running = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._running = False
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        self.seconds = time.perf_counter() - self._started

    @property
    def peak_above_start(self) -> int:
        return self.peak - self._start
