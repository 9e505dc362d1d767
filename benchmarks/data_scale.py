"""The data stage at scale vs a plain streaming tokenizer loop, side by side in one run.

    python benchmarks/data_scale.py                  # 100 MB and 1 GB; ~35 minutes on 2 cores
    python benchmarks/data_scale.py --sizes 100      # 100 MB only (~13 minutes)

Corpora: real text from this machine (Debian copyright files, common licences, man pages
and package changelogs, Python sources of the standard library and installed packages, C
headers, Perl modules), cut into documents of at most ~3,000 characters at blank lines and
written to one JSONL file per size; identical documents are written once. When the machine
holds less distinct text than a size asks for, documents are repeated with a marker line
(``[copy N]``) on top and the output says so.

Both sides read the same file with the quickstart's tokenizer (4,096 tokens) and write
uint16 blocks of 128 tokens:

- plain loop (a fresh process): ``json.loads`` per line, ``encode_batch_fast`` 1,000
  documents at a time, EOS appended, blocks written as they fill. No split, no shards.
- data stage: ``stages.prepare.data.prepare`` submitted as a zero-CPU Ray task, exactly as the
  driver does, on a two-node Ray cluster started here (two ``ray start`` on 127.0.0.1, one
  CPU each, token auth): read units tokenized by a pool of Ray Data actors on both nodes, the
  decontaminated held-out split, shards, manifest.

Both sides are timed as users run them, cold starts included: the plain loop from the moment
its process is started to its exit (Python start, imports, loading the tokenizer), the stage
from the task's submission to its result.

Rule, fixed before measuring (``RULE``): 8 rounds per size up to 200 MB, 2 above (or
``--rounds``), alternating plain/stage (the host's speed drifts over minutes); each round's
ratio is the stage's tokens/s over the plain loop's in that round, and the decision
statistic is the MEDIAN of the rounds' ratios (every round's ratio and each side's fastest
round are listed beside it). Targets (the README's "data stage at 100 MB and 1 GB"): at
100 MB and at 1000 MB the median ratio ≥ 0.9, and no process of the data stage above 1.5 GB
of private memory (the plain loop is the baseline: it has no memory target); a size the run
did not measure says so. Memory is measured in one further round of each side, not in
the timed ones: a sampler reads the private memory (USS) of every process of both sides
every two seconds (the plain loop's process; this process, the Ray task running ``prepare``
and every Ray worker, raylet, GCS and agent of the cluster), and reading ~25 processes'
``smaps_rollup`` costs ~1.3 CPU-seconds per 20 s: on 2 cores that slowed only the side with
25 processes, by ~3%. Results go to the "Data stage at scale" section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from results import Target, stamp, status, targets_table, write_section  # noqa: E402

SEQ_LEN = 128
TARGET_SIZES = (100, 1000)  # MB: the sizes the targets name
MIN_RATIO, MAX_PROCESS_BYTES = 0.9, 1.5e9  # data stage vs plain loop, median tokens/s ratio; per process
RULE = ("Rule, fixed before measuring: 8 rounds per size up to 200 MB, 2 above (unless `--rounds`), alternating "
        "plain/stage; decision statistic: the median of the rounds' ratios (stage tokens/s ÷ plain loop tokens/s "
        "of the same round); memory: one more round of each side, untimed. Targets at 100 MB and 1000 MB: median "
        f"ratio ≥ {MIN_RATIO}; every data-stage process ≤ {MAX_PROCESS_BYTES / 1e9} GB private memory.")

PLAIN_LOOP = r'''
import json, sys, time, numpy as np
from itertools import chain
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
eos, seq = tok.token_to_id("<|endoftext|>"), int(sys.argv[4])
start, tokens, carry = time.perf_counter(), 0, np.empty(0, np.uint16)
def flush(batch, out):
    global carry, tokens
    ids = [e.ids for e in tok.encode_batch_fast(batch, add_special_tokens=False)]
    for row in ids:
        row.append(eos)
    flat = np.fromiter(chain.from_iterable(ids), np.uint16, sum(map(len, ids)))
    tokens += len(flat)
    buf = np.concatenate([carry, flat])
    full = len(buf) // seq * seq
    buf[:full].tofile(out)
    carry = buf[full:]
with open(sys.argv[1], encoding="utf-8") as f, open(sys.argv[3], "wb") as out:
    batch = []
    for line in f:
        batch.append(json.loads(line)["text"])
        if len(batch) == 1000:
            flush(batch, out)
            batch = []
    if batch:
        flush(batch, out)
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start}))
'''


def real_texts():
    """(source, text) of every real text file this machine has, in a fixed order."""
    stdlib, purelib = sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]
    patterns = ["/usr/share/doc/*/copyright", "/usr/share/common-licenses/*", "/usr/share/man/**/*.gz",
                "/usr/share/doc/**/*.gz", f"{stdlib}/**/*.py", f"{purelib}/**/*.py",
                f"{purelib}/*.dist-info/*LICEN*", "/usr/include/**/*.h", "/usr/share/perl/**/*.p[lm]",
                "/usr/lib/x86_64-linux-gnu/perl/**/*.p[lm]"]
    for pattern in patterns:
        for path in sorted(glob.glob(pattern, recursive=True)):
            try:
                raw = gzip.decompress(Path(path).read_bytes()) if path.endswith(".gz") else Path(path).read_bytes()
                yield path, raw.decode("utf-8")
            except (OSError, UnicodeDecodeError, EOFError):
                continue


def build_corpus(path: Path, target: int) -> dict:
    """A JSONL file of ``target`` bytes of real documents; repeats (marked) if text runs out."""
    import corpus

    if path.exists() and path.with_suffix(".json").exists():
        return json.loads(path.with_suffix(".json").read_text())
    seen: set[bytes] = set()
    written = docs = distinct = copies = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        copy = 1
        while written < target:
            before = written
            for _, text in real_texts():
                for piece in corpus.chunk(text.replace("\r\n", "\n")):
                    digest = hashlib.sha256(piece.encode()).digest()
                    if copy == 1 and digest in seen:
                        continue
                    seen.add(digest)
                    doc = piece if copy == 1 else f"[copy {copy}]\n{piece}"
                    line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                    out.write(line)
                    written += len(line.encode())
                    docs += 1
                    distinct += copy == 1
                    copies += copy > 1
                    if written >= target:
                        break
                if written >= target:
                    break
            if written == before:
                raise RuntimeError("no readable text found on this machine")
            copy += 1
    os.replace(tmp, path)
    stats = {"bytes": written, "documents": docs, "distinct": distinct, "repeated": copies}
    path.with_suffix(".json").write_text(json.dumps(stats))
    return stats


class MemorySampler:
    """Peak USS per process of the given process trees, sampled every ``every_s``."""

    def __init__(self, every_s: float = 2.0):
        self.every = every_s
        self.peaks: dict[int, tuple[int, str]] = {}
        self.roots: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self, roots: set[int]) -> None:
        self.roots, self.peaks = roots, {}

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every):
            procs = []
            for root in list(self.roots):
                try:
                    p = psutil.Process(root)
                    procs += [p, *p.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
            for p in procs:
                try:
                    uss, name = _uss(p.pid), _label(p)
                except (OSError, psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if uss > self.peaks.get(p.pid, (0, ""))[0]:
                    self.peaks[p.pid] = (uss, name)

    def top(self) -> tuple[int, str]:
        return max(self.peaks.values(), default=(0, "none"))


def _uss(pid: int) -> int:
    """Private memory (USS) from ``smaps_rollup``: what psutil's ``memory_full_info().uss``
    reports, at a fraction of its cost (the sampler shares the 2 cores it measures)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:", "Private_Hugetlb:")):
                total += int(line.split()[1]) * 1024
    return total


def _label(p) -> str:
    cmd = " ".join(p.cmdline())
    match = re.search(r"ray::(\S+)", cmd) or re.search(r"/(raylet|gcs_server|dashboard\S*|\S*agent\S*)", cmd)
    return match.group(1) if match else p.name()


def run_plain(corpus_path: Path, tokenizer: str, work: Path, sampler: MemorySampler | None = None) -> dict:
    """One run of the plain loop in a fresh process, timed from its start to its exit."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PLAIN_LOOP, str(corpus_path), tokenizer,
                             str(work / "plain.bin"), str(SEQ_LEN)], stdout=subprocess.PIPE, text=True)
    if sampler:
        sampler.reset({proc.pid})
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    result = {**json.loads(out.strip().splitlines()[-1]), "seconds": seconds}
    if sampler:
        result["uss"], result["uss_process"] = sampler.top()
    os.remove(work / "plain.bin")
    return result


def run_stage(corpus_path: Path, tokenizer: str, tok_hash: str, work: Path, sampler: MemorySampler | None = None,
              ray_pids: set[int] = frozenset()) -> dict:
    """One run of the data stage, timed from the task's submission to its result."""
    import shutil

    import ray

    from branchout.core.spec import DatasetSpec
    from branchout.stages.job import DataJob
    from branchout.stages.prepare.data import prepare

    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    if sampler:
        sampler.reset({os.getpid(), *ray_pids})
    start = time.perf_counter()
    task = ray.remote(prepare).options(num_cpus=0)  # as orchestrator/run/driver.py submits it
    info = ray.get(task.remote(DataJob(dataset=DatasetSpec(path=str(corpus_path)), tokenizer_uri=tokenizer,
                                       tokenizer_hash=tok_hash, seq_len=SEQ_LEN, heldout_fraction=0.1, split_seed=0,
                                       cache_root=str(cache))))
    seconds = time.perf_counter() - start
    result = {"tokens": info.tokens, "seconds": seconds, "nodes": info.nodes,
              "moved": info.heldout_moved_near_duplicates, "heldout_docs": info.heldout_docs}
    if sampler:
        result["uss"], result["uss_process"] = sampler.top()
    shutil.rmtree(cache, ignore_errors=True)
    return result


class TwoNodeCluster:
    """A head and a worker node on 127.0.0.1, one CPU each, token auth.

    Stopped by ending exactly the processes that carry its GCS address, never with
    ``ray stop`` (which would end every Ray instance of this user on the machine).
    """

    def __init__(self, workdir: Path):
        import uuid

        from raycluster import free_port

        self.port, self.token = free_port(), uuid.uuid4().hex
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_DISABLE_USAGE_STATS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.workdir = workdir
        # this process joins as a driver: Ray reads its auth settings when it is first imported
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)

    def start(self) -> TwoNodeCluster:
        from raycluster import free_port

        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
        # every port picked free: other Ray instances (test suites) may run on this machine
        subprocess.run(["ray", "start", "--head", f"--port={self.port}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}", *common],
                       check=True, env=self.env, capture_output=True, timeout=120)
        subprocess.run(["ray", "start", f"--address=127.0.0.1:{self.port}", *common],
                       check=True, env=self.env, capture_output=True, timeout=120)
        return self

    def pids(self) -> set[int]:
        """Every process of this cluster: those naming its GCS address, and their children."""
        import psutil

        found = set()
        for p in psutil.process_iter(["cmdline"]):
            if any((f":{self.port}" in part and ("gcs" in part or "address" in part))
                   or part == f"--gcs_server_port={self.port}"  # the GCS itself names only its port
                   for part in p.info["cmdline"] or []):
                found.add(p.pid)
                try:
                    found |= {c.pid for c in p.children(recursive=True)}
                except psutil.NoSuchProcess:
                    continue
        return found

    def stop(self) -> None:
        import psutil

        procs = []
        for pid in self.pids():
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                continue
        pointer = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # `ray start --head` wrote it
        if pointer.exists() and pointer.read_text().strip().endswith(f":{self.port}"):
            pointer.unlink()


def quickstart_tokenizer(work: Path) -> tuple[str, str]:
    """The quickstart's tokenizer (4,096 tokens, trained on its pretraining corpus)."""
    from branchout.core.spec import DatasetSpec, TokenizerSpec
    from branchout.stages.job import TokenizerJob
    from branchout.stages.prepare.tokenizer import tokenizer_hash, tokenizer_job

    import corpus

    uri = work / "tokenizer"
    if not (uri / "MANIFEST.json").exists():
        corpus.build(str(work / "quickstart"))
        general = DatasetSpec(path=str(work / "quickstart" / "general.jsonl"))
        tokenizer_job(TokenizerJob(TokenizerSpec(vocab_size=4096), ((general, 1.0),), 0.1, 0, str(uri)))
    return str(uri), tokenizer_hash(str(uri))


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="Corpus sizes in MB.")
    parser.add_argument("--rounds", type=int, default=0, help="Rounds per size (default: 8 up to 200 MB, else 2).")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "branchout-data-scale"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started, stamped = time.time(), stamp()
    print(RULE, flush=True)
    cluster = TwoNodeCluster(work)
    import ray

    tokenizer, tok_hash = quickstart_tokenizer(work)
    cluster.start()
    rows, notes, measured = [], [], {}
    try:
        ray.init(address=f"127.0.0.1:{cluster.port}", log_to_driver=False)
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        with MemorySampler() as sampler:
            for mb in [int(s) for s in args.sizes.split(",")]:
                path = work / f"corpus-{mb}mb.jsonl"
                stats = build_corpus(path, mb * 10**6)
                if stats["repeated"]:
                    notes.append(f"{mb} MB: this machine holds {stats['distinct']:,} distinct documents, not {mb} MB "
                                 f"of them; {stats['repeated']:,} of the {stats['documents']:,} documents are "
                                 "repeats, each with a marker line `[copy N]` on top.")
                rounds = args.rounds or (8 if mb <= 200 else 2)
                tok_file = str(Path(tokenizer) / "tokenizer.json")
                plain, stage = [], []
                for r in range(rounds):
                    plain.append(run_plain(path, tok_file, work))
                    stage.append(run_stage(path, tokenizer, tok_hash, work))
                    print(f"{mb} MB round {r + 1}: plain {plain[-1]['tokens'] / plain[-1]['seconds'] / 1e6:.2f} "
                          f"M tok/s, stage {stage[-1]['tokens'] / stage[-1]['seconds'] / 1e6:.2f} M tok/s", flush=True)
                memory = (run_plain(path, tok_file, work, sampler),
                          run_stage(path, tokenizer, tok_hash, work, sampler, cluster.pids()))
                print(f"{mb} MB memory round: plain {gib(memory[0]['uss'])}, stage {gib(memory[1]['uss'])} "
                      f"({memory[1]['uss_process']})", flush=True)
                row, measured[mb] = _row(mb, stats, plain, stage, memory)
                rows.append(row)
                print(row, flush=True)
    finally:
        ray.shutdown()
        cluster.stop()
    header = ["| corpus | data stage vs plain loop (tokens/s, median of the rounds' ratios) | raw numbers | peak private memory, data stage "
              "(largest process) | peak private memory, plain loop | nodes that tokenized | targets |",
              "|---|---|---|---|---|---|---|"]
    targets = []
    for mb in sorted({*TARGET_SIZES, *measured}):
        if mb not in measured:
            why = f"`--sizes {args.sizes}` did not include {mb} MB"
            targets += [Target(f"{mb} MB: data stage vs plain loop, tokens/s (median of the rounds)",
                               f"≥ {MIN_RATIO}", None, "not measured", why=why),
                        Target(f"{mb} MB: private memory of the data stage's largest process",
                               f"≤ {MAX_PROCESS_BYTES / 1e9} GB", None, "not measured", why=why)]
            continue
        m = measured[mb]
        targets += [Target(f"{mb} MB: data stage vs plain loop, tokens/s (median of the rounds)", f"≥ {MIN_RATIO}",
                           f"{m['ratio']:.3f}", status(m["ratio"] >= MIN_RATIO),
                           why=f"the rounds' ratios ran {min(m['rounds']):.2f} to {max(m['rounds']):.2f}, "
                               f"the median below {MIN_RATIO}"),
                    Target(f"{mb} MB: private memory of the data stage's largest process",
                           f"≤ {MAX_PROCESS_BYTES / 1e9} GB", f"{m['uss'] / 1e9:.2f} GB ({m['where']})",
                           status(m["uss"] <= MAX_PROCESS_BYTES), why=f"{m['where']} held more")]
    write_section("Data stage at scale", [
        f"`python benchmarks/data_scale.py --sizes {args.sizes}{f' --rounds {args.rounds}' if args.rounds else ''}` "
        f"on {time.strftime('%Y-%m-%d')}; {stamped}. "
        f"{nodes}-node Ray cluster on this machine (1 CPU each); took "
        f"{(time.time() - started) / 60:.0f} minutes.", "", RULE, "",
        "Quickstart tokenizer (4,096 tokens), JSONL of real text, "
        "128-token uint16 blocks; plain loop = `json.loads` + `encode_batch_fast` 1,000 documents at a time + "
        "EOS + blocks written as they fill; data stage = `prepare` as a zero-CPU Ray task (Ray Data "
        "tokenization, decontaminated split, shards, manifest). Both timed cold as users run them: the plain "
        "loop's process from start to exit, the stage from task submission to result. Memory: peak USS sampled "
        "every 2 s over every process (driver, the task running `prepare`, Ray workers, raylets, GCS); the "
        "sampler is kept out of the timed rounds because its own CPU slowed only the many-process side.",
        "", *header, *rows, "", *notes, *([""] if notes else []), *targets_table(targets)])
    print("\n".join(header + rows + notes + targets_table(targets)))
    return 0


def _row(mb: int, stats: dict, plain: list[dict], stage: list[dict],
         memory: tuple[dict, dict]) -> tuple[str, dict]:
    """The table row of one size, and what its targets are judged on: the median of the
    rounds' ratios (and the ratios), the data stage's largest process (bytes) and its name.
    Each side's fastest round is shown too (noise on a shared host only ever slows a run down)."""
    p_tps, s_tps = max(map(_tps, plain)), max(map(_tps, stage))
    rounds = [_tps(s) / _tps(p) for p, s in zip(plain, stage, strict=True)]
    ratio = statistics.median(rounds)
    p_uss, (s_uss, s_where) = memory[0]["uss"], (memory[1]["uss"], memory[1]["uss_process"])
    raw = (f"median of {len(rounds)} rounds' ratios ({', '.join(f'{r:.2f}' for r in rounds)}); fastest round "
           f"{s_tps / 1e6:.2f} vs {p_tps / 1e6:.2f} M tokens/s ({s_tps / p_tps:.3f}); {stage[0]['tokens'] / 1e6:.0f} "
           f"M tokens, {stats['documents']:,} documents; {stage[0]['moved']:,} held-out documents moved as "
           f"near-duplicates; memory round (sampler on): {_tps(memory[1]) / 1e6:.2f} vs "
           f"{_tps(memory[0]) / 1e6:.2f} M tokens/s")
    return (f"| {mb} MB | {ratio:.3f} | {raw} | {gib(s_uss)} ({s_where}) | {gib(p_uss)} | "
            f"{max(s['nodes'] for s in stage)} | ≥ {MIN_RATIO}; ≤ {MAX_PROCESS_BYTES / 1e9} GB each |",
            {"ratio": ratio, "rounds": rounds, "uss": s_uss, "where": s_where})


def _tps(run: dict) -> float:
    return run["tokens"] / run["seconds"]


if __name__ == "__main__":
    sys.exit(main())
