"""Checkpoint save and verified load vs a raw copy/read of the same bytes on the same disk.

    python benchmarks/checkpoint_io.py [--mb 512] [--files 8]

save  = branchout's publish_dir: copy to a staging name, fsync every file, SHA-256 manifest
        written last, atomic rename.            baseline: `cp -r` then `sync`.
load  = fetch_verified: every file's size and SHA-256 checked against the manifest.
        baseline: reading every byte once (`cat > /dev/null`), page cache dropped where allowed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from branchout.stages.checkpoint import fetch_verified, publish_dir


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="Total checkpoint size in MiB.")
    parser.add_argument("--files", type=int, default=8, help="Number of shard files.")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="branchout-ckpt-bench-", dir=os.environ.get("BENCH_DIR")))
    src = root / "src"
    src.mkdir()
    per_file = args.mb * (1 << 20) // args.files
    for i in range(args.files):
        with open(src / f"shard_{i:03d}.bin", "wb") as f:
            f.write(os.urandom(per_file))
    nbytes = per_file * args.files
    rows = []
    for r in range(args.repeat):
        cp_dst, pub_dst = root / f"cp{r}", root / f"pub{r}"
        cp = _timed(lambda d=cp_dst: (subprocess.run(["cp", "-r", str(src), str(d)], check=True), os.sync()))
        save = _timed(lambda d=pub_dst: publish_dir(str(src), str(d)))
        cold = _drop_caches()
        read = _timed(lambda d=cp_dst: subprocess.run(f"cat {d}/* > /dev/null", shell=True, check=True))
        _drop_caches()
        load = _timed(lambda d=pub_dst: fetch_verified(str(d)))
        rows.append((cp, save, read, load, cold))
        shutil.rmtree(cp_dst)
        shutil.rmtree(pub_dst)
    shutil.rmtree(root)
    best = [min(r[i] for r in rows) for i in range(4)]
    cold = all(r[4] for r in rows)
    mb = nbytes / (1 << 20)
    print(f"checkpoint I/O: {mb:.0f} MiB in {args.files} files, best of {args.repeat}, "
          f"page cache {'dropped before reads' if cold else 'NOT dropped (no permission): reads are warm'}")
    print(f"{'operation':28s} {'seconds':>8s} {'MiB/s':>8s} {'ratio':>7s}")
    print(f"{'cp -r + sync':28s} {best[0]:8.2f} {mb / best[0]:8.0f} {'1.00':>7s}")
    print(f"{'publish_dir (save)':28s} {best[1]:8.2f} {mb / best[1]:8.0f} {best[0] / best[1]:7.2f}  save/cp throughput")
    print(f"{'cat > /dev/null':28s} {best[2]:8.2f} {mb / best[2]:8.0f} {'1.00':>7s}")
    print(f"{'fetch_verified (load)':28s} {best[3]:8.2f} {mb / best[3]:8.0f} {best[2] / best[3]:7.2f}  load/read throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
