"""Benchmarks: `python -m bench` (or `make bench`) compares the contenders; `python -m bench.NAME` runs one other
measurement. Each prints its figures as it goes, through say()."""


def say(text: str) -> None:
    """Print a line at once (a run's progress shows while it runs, whatever buffers stdout)."""
    print(text, flush=True)
