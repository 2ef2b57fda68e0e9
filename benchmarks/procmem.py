"""This process's memory as Linux reports it in /proc: resident set, its peak, a peak reset, and a heap trim, shared
by the cost and memory benchmarks' workers."""

from __future__ import annotations


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss() -> int:
    """Resident set size in bytes (VmRSS)."""
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak resident set size in bytes since start or the last ``reset_peak_rss`` (VmHWM)."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS; False where the kernel refuses (then peaks count from process start)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def trim() -> None:
    """Give freed heap memory back to the OS, so that later RSS growth is not hidden by reuse (or inflated)."""
    import gc

    from svfit.core.factorize import release_freed_heap

    gc.collect()
    release_freed_heap()
