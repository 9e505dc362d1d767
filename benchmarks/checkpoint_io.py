"""Checkpoint save and verified load vs a raw copy/read of the same bytes on the same disk.

    python benchmarks/checkpoint_io.py [--mb 512] [--files 8]

save  = branchout's publish_dir: copy to a staging name, fsync every file, SHA-256 manifest
        written last, atomic rename.            baseline: `cp -r` then `sync`.
load  = fetch_verified: every file's size and SHA-256 checked against the manifest.
        baseline: reading every byte once (`cat > /dev/null`), page cache dropped where allowed.

Rule, fixed before measuring: --repeat rounds (3), each timing the baseline and then
branchout's operation on the same bytes; the decision statistic is the median of the
rounds' own ratios (branchout's throughput ÷ the baseline's in that round); the median
seconds of each operation are shown beside it. Targets (none was written before issue 33;
these are the first): a save that is durable and checksummed keeps ≥ 0.8 of `cp -r` +
`sync`'s throughput, and a verified load ≥ 0.8 of a raw read's, from disk. Where the page
cache cannot be dropped the reads come from memory, which the load target is not about: it
is then not measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from branchout.storage import checkpoint
from branchout.storage.checkpoint import fetch_verified, publish_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import Target, stamp, status, targets_table, write_section  # noqa: E402

TARGET = 0.8  # of the baseline's throughput, for save and for load


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
    stamped = stamp()  # before the runs: the commit and machine they measure
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
        # publish_dir remembers the digests of files it hashed (by path, size, mtime): without
        # this, every round after the first would save src without hashing it
        checkpoint._DIGESTS.clear()
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
    med = [statistics.median(r[i] for r in rows) for i in range(4)]
    save_ratio = statistics.median(r[0] / r[1] for r in rows)  # throughput: the baseline's seconds ÷ ours
    load_ratio = statistics.median(r[2] / r[3] for r in rows)
    cold = all(r[4] for r in rows)
    mb = nbytes / (1 << 20)
    lines = [f"`python benchmarks/checkpoint_io.py` on {time.strftime('%Y-%m-%d')}: {mb:.0f} MiB in {args.files} "
             f"files; page cache {'dropped before reads' if cold else 'NOT dropped (no permission): reads are warm'}; "
             f"{stamped}.", "",
             f"Rule: {args.repeat} rounds, each the baseline then branchout's operation; seconds are the median "
             "of the rounds, the ratio the median of the rounds' own throughput ratios.", "",
             "| operation | seconds | MiB/s | ratio |", "|---|---|---|---|",
             f"| cp -r + sync | {med[0]:.2f} | {mb / med[0]:.0f} | 1.00 |",
             f"| publish_dir (copy + fsync + SHA-256 manifest) | {med[1]:.2f} | {mb / med[1]:.0f} | "
             f"{save_ratio:.2f} of cp's throughput |",
             f"| cat > /dev/null | {med[2]:.2f} | {mb / med[2]:.0f} | 1.00 |",
             f"| fetch_verified (read + SHA-256) | {med[3]:.2f} | {mb / med[3]:.0f} | "
             f"{load_ratio:.2f} of raw read throughput |", "",
             *targets_table([
                 Target("publish_dir's throughput vs `cp -r` + `sync`", f"≥ {TARGET}", f"{save_ratio:.2f}",
                        status(save_ratio >= TARGET),
                        why="what publish_dir adds to the copy: an fsync per file and a SHA-256 pass over "
                            "every byte"),
                 Target("fetch_verified's throughput vs a raw read, from disk", f"≥ {TARGET}",
                        f"{load_ratio:.2f}" if cold else None, status(load_ratio >= TARGET if cold else None),
                        why="the page cache could not be dropped (no permission), so both sides read from memory"
                        if not cold else "what fetch_verified adds to the read: a SHA-256 pass over every byte")])]
    print("\n".join(lines))
    write_section("Checkpoint I/O (benchmarks/checkpoint_io.py)", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
