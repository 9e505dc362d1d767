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

from branchout.storage.checkpoint import fetch_verified, publish_dir


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
        read = _timed(lambda d=cp_dst: subprocess.run(["cat", *map(str, sorted(d.iterdir()))],
                                                      stdout=subprocess.DEVNULL, check=True))
        _drop_caches()
        load = _timed(lambda d=pub_dst: fetch_verified(str(d)))
        rows.append((cp, save, read, load, cold))
        shutil.rmtree(cp_dst)
        shutil.rmtree(pub_dst)
    shutil.rmtree(root)
    best = [min(r[i] for r in rows) for i in range(4)]
    cold = all(r[4] for r in rows)
    mb = nbytes / (1 << 20)
    lines = [f"`python benchmarks/checkpoint_io.py` on {time.strftime('%Y-%m-%d')}: {mb:.0f} MiB in {args.files} "
             f"files, best of {args.repeat}; page cache "
             f"{'dropped before reads' if cold else 'NOT dropped (no permission): reads are warm'}.", "",
             "| operation | seconds | MiB/s | ratio |", "|---|---|---|---|",
             f"| cp -r + sync | {best[0]:.2f} | {mb / best[0]:.0f} | 1.00 |",
             f"| publish_dir (copy + fsync + SHA-256 manifest) | {best[1]:.2f} | {mb / best[1]:.0f} | "
             f"{best[0] / best[1]:.2f} of cp's throughput |",
             f"| cat > /dev/null | {best[2]:.2f} | {mb / best[2]:.0f} | 1.00 |",
             f"| fetch_verified (read + SHA-256) | {best[3]:.2f} | {mb / best[3]:.0f} | "
             f"{best[2] / best[3]:.2f} of raw read throughput |"]
    print("\n".join(lines))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results import write_section

    write_section("Checkpoint I/O (benchmarks/checkpoint_io.py)", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
