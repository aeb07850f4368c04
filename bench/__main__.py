"""``./run bench``: every benchmark of bench/, one after the other, at full size."""

from __future__ import annotations

import subprocess
import sys

BENCHES = (
    "bench.bench_ingest",
    "bench.bench_matching",
    "bench.bench_delivery",
    "bench.bench_far_relay",
    "bench.bench_cycle",
)

if __name__ == "__main__":
    for module in BENCHES:
        subprocess.run([sys.executable, "-m", module, *sys.argv[1:]], check=True)
