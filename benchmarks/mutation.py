"""Mutation testing of the code that decides correctness, with cosmic-ray.

    python benchmarks/mutation.py              # every area, ~40 minutes on 2 cores
    python benchmarks/mutation.py --area cache # one area (the section keeps only a full run)
    python benchmarks/mutation.py --fresh      # rerun areas whose inputs did not change too

For each area below (a module, the functions in it that decide the area's correctness, and the
unit tests that guard it) cosmic-ray changes one thing at a time in those functions (a
comparison flipped, a constant changed, a loop that never runs, ...), runs the area's tests,
and restores the file. A mutant is *killed* when the tests fail (or time out); one that
*survives* is a change no test noticed: either a missing test, or an equivalent mutant (the
program means the same, e.g. ``>= 0`` vs ``> 0`` where the value can never be 0).
Mutants inside type annotations are not run (see ``annotation_spans``).
``EQUIVALENT`` lists the survivors read and judged equivalent, each with why; every other
survivor is listed in RESULTS.md as uncaught.

Rule, fixed before measuring: one run, every mutant of the selected lines run once. Score =
killed / (killed + survived − those judged equivalent); target (issue 33) ≥ 85% over all areas together;
each area's own score is shown. Operators: cosmic-ray's, with one replacement per binary and
comparison operator instead of every other operator (mutmut's choice: ``+`` → ``-``, ``*`` →
``/``, ``<`` → ``<=``, ``==`` → ``!=``, ...): cosmic-ray's ten swaps of ``a + b`` (to ``a << b``,
``a ^ b``, ...) are killed by whatever kills ``a - b`` and would triple the run.

An area's result is kept in benchmarks/out/mutation/ under the SHA-256 of its inputs (the
module, its tests, tests/conftest.py, its function list, the operators, the test command,
cosmic-ray's version) and reused while they are unchanged; the
section says which areas ran and which were reused.

Mutants run in copies of the tree (one per core, each served by a ``cosmic-ray http-worker``
with the copy first on PYTHONPATH so ``import branchout`` finds it): the checkout itself is
never edited. The copies hold the tree as it is, uncommitted changes included, and the stamp
says ``+dirty`` then.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import Target, stamp, status, targets_table, write_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TITLE = "Mutation testing (benchmarks/mutation.py)"
PYTEST = f"{sys.executable} -m pytest -x -q -p no:cacheprovider --no-header"
TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Area:
    name: str
    module: str
    functions: tuple[str, ...]  # "func", "Class.method", or "@validators" for every pydantic validator
    tests: tuple[str, ...]  # files, or pytest node ids (file::test) where a file's other tests test other things


AREAS = [
    Area("cache", "orchestrator/run/cache.py",
         ("code_version", "code_hash", "model_fingerprint", "_h", "data_fingerprints", "job_keys",
          "StageCache.lookup", "StageCache.store"),
         ("tests/unit/test_cache_keys.py",)),
    Area("checkpoint", "storage/checkpoint.py",
         ("build_manifest", "_hash_all", "read_manifest", "manifest_problems", "write_rank_manifest", "_manifests",
          "verify_local", "fetch_verified", "written_world", "newest_good", "rank_problems", "full_problems",
          "_sha256_file"),
         ("tests/unit/test_checkpoints.py", "tests/unit/test_hostile_manifests.py")),
    Area("split", "stages/prepare/split.py",
         ("is_heldout", "shingles", "_sampled_hashes", "_sorted_unique", "_partition", "contains_sorted",
          "Decontaminator.add_train", "Decontaminator._spill", "Decontaminator.add_heldout",
          "Decontaminator._train_partition", "Decontaminator.finish", "Decontaminator._settle"),
         ("tests/unit/test_data_split.py",)),
    Area("batches", "stages/training/batches.py",
         ("BlockOrder.__init__", "BlockOrder._perm", "BlockOrder._layout", "BlockOrder._window_blocks",
          "BlockOrder._at", "BlockOrder.blocks", "BlockOrder.rank_blocks", "step_micro_batches", "epochs_for"),
         ("tests/unit/test_data_stream.py::test_a_rank_reads_only_the_shards_its_blocks_come_from",
          "tests/unit/test_data_stream.py::test_shard_aware_order_is_a_pure_function_and_ranks_are_disjoint",
          "tests/unit/test_units.py::test_block_order_visits_every_block_once_per_epoch",
          "tests/unit/test_units.py::test_block_order_edges_and_the_shard_aware_sequence",
          "tests/unit/test_units.py::test_ranks_read_disjoint_blocks_within_a_step",
          "tests/unit/test_mixture.py::test_every_prefix_holds_each_source_by_weight",
          "tests/unit/test_mixture.py::test_the_order_is_a_function_of_the_position_and_any_world_reads_the_same_samples")),
    Area("spec", "core/spec.py", ("@validators", "_check_slug", "_scalar_kinds", "ProbeSpec.points"),
         ("tests/unit/test_spec.py", "tests/unit/test_bad_input_corpus.py")),
]

# One replacement kept per binary and comparison operator (see the docstring); cosmic-ray's
# other swaps of those operators are filtered out by name.
KEPT_SWAPS = {"Add_Sub", "Sub_Add", "Mul_Div", "Div_Mul", "FloorDiv_Div", "Mod_FloorDiv", "Pow_Mul",
              "LShift_RShift", "RShift_LShift", "BitOr_BitAnd", "BitAnd_BitOr", "BitXor_BitOr",
              "Eq_NotEq", "NotEq_Eq", "Lt_LtE", "LtE_Lt", "Gt_GtE", "GtE_Gt", "Is_IsNot", "IsNot_Is"}


def excluded_operators() -> list[str]:
    names = cr("cosmic-ray", "operators").split()
    swaps = [n for n in names if n.startswith(("core/ReplaceBinaryOperator_", "core/ReplaceComparisonOperator_"))]
    return [f"^{n}$" for n in swaps if n.split("Operator_", 1)[1] not in KEPT_SWAPS]

# Survivors read and judged equivalent: (module, the line's text, operator) → why, for every
# mutant of that operator on that line; or (module, line, operator, the line as mutated) → why,
# for that one mutant.
CACHE_PY = "orchestrator/run/cache.py"
EQUIVALENT: dict[tuple[str, ...], str] = {
    (CACHE_PY, "@lru_cache(maxsize=1)", "NumberReplacer"):
        "the size of a per-process memo of code_version; any size (0 included) returns the same version",
    (CACHE_PY, 'return f"{__version__}+{h.hexdigest()[:12]}"', "NumberReplacer"):
        "how many hex digits of the code hash the version shows; any length keys the same code the same",
    (CACHE_PY, "return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]",
     "NumberReplacer"): "the length of a key (23 or 25 of SHA-256's hex digits): equal inputs still give equal keys",
    (CACHE_PY, 'storage.write_text(storage.join(self.root, f"{key}.json"), json.dumps(entry, indent=1))',
     "NumberReplacer"): "the indentation of the index entry's JSON; it reads back the same",
}
SPLIT = "stages/prepare/split.py"
_SPILL = "if self._pending_n >= 1 << 21:  # spill ~16 MB at a time: few, large appends"
_SPLIT_POOL = "with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:"
_SLICE = "t = tokens[a:b + NGRAM - 1].astype(np.uint64)"
_H8 = "h = h4[:b - a] + h4[4:4 + b - a] * _P4"
EQUIVALENT.update({
    (SPLIT, 'return int.from_bytes(digest, "big") / 2**64 < fraction', "ReplaceComparisonOperator_Lt_LtE"):
        "differs only for a document whose hash is exactly fraction × 2**64 (probability 2**-64)",
    (SPLIT, "if len(tokens) < NGRAM + 1:", "NumberReplacer", "if len(tokens) < NGRAM + 0:"):
        "an input of exactly NGRAM tokens ends in its EOS: its one n-gram is not text and is dropped either way",
    (SPLIT, "n = len(tokens) - NGRAM + 1", "NumberReplacer"):
        "the input's last n-gram always covers the last document's EOS, so it is dropped anyway",
    **{(SPLIT, _SLICE, op): "a longer slice of tokens: the hashes are taken from its first b - a positions "
       "only, the same values" for op in ("ReplaceBinaryOperator_Sub_Add", "NumberReplacer")},
    **{(SPLIT, _H8, op): "the second slice reaches past h4's end, which clips it to the same b - a values"
       for op in ("ReplaceBinaryOperator_Sub_Add", "NumberReplacer")},
    **{(SPLIT, _SPILL, op): "when pending training shingles are spilled to disk: any batching appends the same "
       "values to the same partitions" for op in ("ReplaceComparisonOperator_GtE_Gt", "ReplaceBinaryOperator_LShift_RShift",
                                                 "AddNot", "NumberReplacer")},
    (SPLIT, "self._pending, self._pending_n = [], 0", "NumberReplacer"):
        "the spill counter's start after a spill: it only moves when the next spill happens",
    **{(SPLIT, _SPLIT_POOL, op): "how many threads check the partitions (at least one): each writes its own "
       "slice, the same result" for op in ("NumberReplacer", "ReplaceOrWithAnd")},
    (SPLIT, "held = np.concatenate(self._held) if self._held else np.empty(0, np.uint64)", "NumberReplacer",
     "held = np.concatenate(self._held) if self._held else np.empty( 1, np.uint64)"):
        "with no held-out document, one unset shingle that belongs to no document: nothing moves or is written",
    **{(SPLIT, f"{name} = np.searchsorted({of}, np.arange((1 << PARTITION_BITS) + 1))", "NumberReplacer",
        f"{name} = np.searchsorted({of}, np.arange({more}))"):
       "bounds past the last partition all equal the array's length: empty partitions nothing reads"
       for name, of in (("bounds", "parts[order]"), ("edges", "_partition(uniq)"))
       for more in ("( 2 << PARTITION_BITS) + 1", "(1 << PARTITION_BITS) + 2")},
    (SPLIT, "if len(haystack) == 0 or len(needles) == 0:", "NumberReplacer",
     "if len(haystack) == 0 or len(needles) == -1:"):
        "no needles: the general path also returns an empty answer",
})
BATCHES = "stages/training/batches.py"
_WINDOWS = "if len(self._windows) > 4:  # a rank moves through windows in order: keep a few"
EQUIVALENT.update({
    (BATCHES, "epochs, within = k // span, (rank * span + k % span) % self.n", "ReplaceBinaryOperator_FloorDiv_Div"):
        "float epochs: each position becomes its own group, and int() floors it to the same epoch (same blocks)",
    **{(BATCHES, _WINDOWS, op): "how many shuffled windows the memo keeps; an evicted one is drawn again from "
       "the same seed" for op in ("ReplaceComparisonOperator_Gt_GtE", "AddNot", "NumberReplacer")},
})
SPEC = "core/spec.py"
EQUIVALENT[(SPEC, "@classmethod", "RemoveDecorator")] = (
    "pydantic 2 calls field and model validators as class methods whether or not @classmethod is written")
EQUIVALENT[(SPEC, "if not kinds or v is None:", "ReplaceOrWithAnd")] = (
    "the early return is a shortcut: with no scalar kinds every later test asks `X in kinds` and is false, and "
    "None is no bool, float or str, so each check passes it through to the same `return v`")
CKPT = "storage/checkpoint.py"
_POOL = "with ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(paths))) as pool:"
_MEMO = "if len(_DIGESTS) > 100_000:"
EQUIVALENT.update({
    (CKPT, 'return {"version": 1, "created": time.time(), "files": files}', "NumberReplacer"):
        "the manifest format's version number, written for later readers; nothing reads it yet",
    **{(CKPT, "if len(paths) <= 1:", op): "whether a single file is hashed inline or on a one-thread pool: the "
       "same digests" for op in ("ReplaceComparisonOperator_LtE_Lt", "NumberReplacer")},
    **{(CKPT, _POOL, op): "how many threads hash the files (1 at least, since len(paths) > 1 here): the same "
       "digests" for op in ("NumberReplacer", "ReplaceOrWithAnd")},
    (CKPT, "return dict(zip(paths, pool.map(_sha256_file, paths), strict=True))", "ReplaceTrueWithFalse"):
        "map returns one digest per path, so the zip's lengths always agree",
    **{(CKPT, _MEMO, op): "when the per-process digest memo is emptied; a file no longer in it is hashed again, "
       "to the same digest" for op in ("ReplaceComparisonOperator_Gt_GtE", "AddNot", "NumberReplacer")},
    (CKPT, "if storage.is_local(uri):", "AddNot"):
        "a local checkpoint verified through a temporary copy instead of in place: the same files, the same verdict",
})


def line_ranges(module: Path, names: tuple[str, ...]) -> list[tuple[int, int]]:
    """The line ranges (decorators included) of the named functions; "@validators" picks every
    function decorated with a pydantic ``field_validator`` or ``model_validator``."""
    tree = ast.parse(module.read_text())
    found: dict[str, ast.AST] = {}
    validators = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef):
                    found[f"{node.name}.{sub.name}"] = sub
                    decorators = [ast.unparse(d) for d in sub.decorator_list]
                    if any("field_validator" in d or "model_validator" in d for d in decorators):
                        validators.append(sub)
    nodes = []
    for name in names:
        if name == "@validators":
            nodes += validators
        elif name in found:
            nodes.append(found[name])
        else:
            raise SystemExit(f"{module}: no function {name} (the area's list is out of date)")
    return sorted({(min([n.lineno, *(d.lineno for d in n.decorator_list)]), n.end_lineno) for n in nodes})


def config(area: Area, ranges: list[tuple[int, int]], urls: list[str]) -> str:
    tests = " ".join(area.tests)
    lines = ", ".join(f'"{a}-{b}"' for a, b in ranges)
    excluded = ", ".join(json.dumps(r) for r in excluded_operators())
    return (f'[cosmic-ray]\nmodule-path = "{area.module}"\ntimeout = {TIMEOUT_S}\nexcluded-modules = []\n'
            f'test-command = "{PYTEST} {tests}"\n\n[cosmic-ray.distributor]\nname = "http"\n\n'
            f"[cosmic-ray.distributor.http]\nworker-urls = {json.dumps(urls)}\n\n"
            f"[cosmic-ray.filters.operators-filter]\nexclude-operators = [{excluded}]\n\n"
            f'[cosmic-ray.filters.line-filter]\nlines = {{ "{area.module}" = [{lines}] }}\n')


class Workers:
    """``n`` copies of the tree under ``root``, each with a cosmic-ray http-worker in it."""

    def __init__(self, root: Path, n: int):
        import socket

        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split("\0")
        self.procs, self.urls, self.copies = [], [], []
        for i in range(n):
            copy = root / f"worker-{i}" / "branchout"  # the folder's name is the package's
            for name in filter(None, files):
                src = REPO / name
                if src.is_file():
                    (copy / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, copy / name)
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            # the copy's parent first on the path: `import branchout` finds the copy, not the
            # editable install (whose finder comes after the path's)
            env = {**os.environ, "PYTHONPATH": str(copy.parent), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
            with open(root / f"worker-{i}.log", "w") as log:  # the child keeps its own descriptor
                self.procs.append(subprocess.Popen([str(Path(sys.executable).parent / "cosmic-ray"), "http-worker",
                                                    "--port", str(port)], cwd=copy, env=env, stdout=log, stderr=log))
            self.urls.append(f"http://127.0.0.1:{port}")
            self.copies.append(copy)
        for url in self.urls:
            wait_for_port(int(url.rsplit(":", 1)[1]))

    def check_imports(self) -> None:
        for copy in self.copies:
            env = {**os.environ, "PYTHONPATH": str(copy.parent)}
            where = subprocess.run([sys.executable, "-c", "import branchout; print(branchout.__file__)"], cwd=copy,
                                   env=env, capture_output=True, text=True).stdout.strip()
            if not where.startswith(str(copy)):
                raise SystemExit(f"a worker's copy imports branchout from {where}, not from {copy}")

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(30)


def wait_for_port(port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"no cosmic-ray worker answered on port {port}") from None
            time.sleep(0.2)


def annotation_spans(module: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of every type annotation of ``module``'s functions. Every module
    here starts with ``from __future__ import annotations``: a function's annotations are
    strings nobody evaluates, so a mutant there (``str | None`` → ``str & None``) changes
    nothing and is not run."""
    spans = []
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            notes = [a.annotation for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
                     if a is not None and a.annotation is not None]
            for note in [*notes, node.returns]:
                if note is not None:
                    spans.append(((note.lineno, note.col_offset), (note.end_lineno, note.end_col_offset)))
    return spans


def skip_annotations(session: Path, module: Path) -> int:
    """Mark the session's mutants inside annotations as skipped; how many."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans = annotation_spans(module)
    with use_db(str(session), WorkDB.Mode.open) as db:
        inside = [item.job_id for item in db.pending_work_items
                  if all(any(a <= tuple(m.start_pos) and tuple(m.end_pos) <= b for a, b in spans) for m in item.mutations)]
        if inside:
            db.set_multiple_results(inside, WorkResult(output="in a type annotation (never evaluated)",
                                                       worker_outcome=WorkerOutcome.SKIPPED))
    return len(inside)


def cr(*args: str, cwd: Path = REPO) -> str:
    bindir = Path(sys.executable).parent
    done = subprocess.run([str(bindir / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def mutated_line(diff: str) -> str:
    """The original text of the line a mutant changed, read from its diff."""
    for line in diff.splitlines():
        if line.startswith("-") and not line.startswith("---") and line[1:].strip():
            return line[1:].strip()
    return ""


CACHE = REPO / "benchmarks" / "out" / "mutation"
# How mutants are chosen besides the operators and lines (annotation_spans): change this string
# when that changes, so earlier results are not reused. (Not the function's source: inspect reads
# it from the file on disk, which may have been edited since the script started.)
SELECTION = "line ranges of the listed functions; mutants inside function annotations skipped"


def inputs_digest(area: Area, root: Path) -> str:
    """What an area's result depends on: the module, its tests and the conftest they load, the
    area's functions, the operators kept, the test command and cosmic-ray's version (not the
    EQUIVALENT judgments, applied when the section is written). The same inputs give the same
    mutants and verdicts (the tests are deterministic), so a result is reused only while none
    of them changed."""
    from importlib.metadata import version

    digest = hashlib.sha256(repr((area, sorted(KEPT_SWAPS), PYTEST.split()[1:], version("cosmic-ray"),
                                  SELECTION)).encode())
    tests = sorted({t.split("::")[0] for t in area.tests})  # a file, or tests of it by node id
    for path in [root / area.module, root / "tests" / "conftest.py", *(root / t for t in tests)]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def changed_line(diff: str) -> str:
    """The mutated line, as the mutant's diff shows it."""
    for line in diff.splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            return line[1:].strip()
    return ""


def run_area(area: Area, work: Path, reuse: bool, workers: Workers) -> dict:
    # everything from the copy the workers test (made at the start), not from the checkout,
    # which may have changed since
    copy = workers.copies[0]
    ranges = line_ranges(copy / area.module, area.functions)
    cached = CACHE / f"{area.name}-{inputs_digest(area, copy)}.json"
    if reuse and cached.exists():
        out = json.loads(cached.read_text())
        print(f"{area.name}: reused (its module, tests, functions and operators unchanged since it ran)", flush=True)
        return {**out, "area": area, "ranges": [tuple(r) for r in out["ranges"]], "reused": True}
    cfg, session = work / f"{area.name}.toml", work / f"{area.name}.sqlite"
    cfg.write_text(config(area, ranges, workers.urls))
    started = time.time()
    baseline = subprocess.run(f"{PYTEST} {' '.join(area.tests)}".split(), cwd=copy, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(copy.parent), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    if baseline.returncode != 0:
        raise SystemExit(f"{area.name}: the tests fail without any mutant:\n{baseline.stdout[-3000:]}")
    base_s = time.time() - started
    cr("cosmic-ray", "init", str(cfg), str(session), cwd=copy)
    cr("cr-filter-operators", str(session), str(cfg))
    cr("cr-filter-lines", "--config", str(cfg), str(session))
    skip_annotations(session, copy / area.module)
    started = time.time()
    cr("cosmic-ray", "exec", str(cfg), str(session))
    seconds = time.time() - started
    killed = survived = incompetent = 0
    survivors = []
    for raw in cr("cosmic-ray", "dump", str(session)).splitlines():
        item, result = json.loads(raw)
        if result is None or result.get("worker_outcome") == "skipped":
            continue
        outcome = result.get("test_outcome")
        if outcome == "killed":
            killed += 1
        elif outcome == "survived":
            survived += 1
            mutation = item["mutations"][0]
            text = mutated_line(result.get("diff") or "")
            op = mutation["operator_name"].replace("core/", "")
            survivors.append({"line": mutation["start_pos"][0], "operator": op, "text": text,
                              "diff": result.get("diff") or ""})
        else:
            incompetent += 1
    print(f"{area.name}: {killed} killed, {survived} survived, {incompetent} incompetent in {seconds:.0f} s", flush=True)
    out = {"ranges": ranges, "killed": killed, "survived": survived, "incompetent": incompetent,
           "survivors": survivors, "seconds": seconds, "baseline_s": base_s}
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(out))
    return {**out, "area": area}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--area", choices=[a.name for a in AREAS], action="append")
    parser.add_argument("--fresh", action="store_true", help="run every area, even one whose inputs did not change")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    parser.add_argument("--write", action="store_true",
                        help="write the section from a run of some areas (the target then says not measured)")
    args = parser.parse_args()
    areas = [a for a in AREAS if not args.area or a.name in args.area]
    measured_stamp = stamp()
    with tempfile.TemporaryDirectory(prefix="branchout-mutation-") as tmp:
        workers = Workers(Path(tmp), args.workers)
        try:
            workers.check_imports()
            results = [run_area(a, Path(tmp), not args.fresh, workers) for a in areas]
        finally:
            workers.close()

    rows, listed = [], []
    total_killed = total_mutants = total_equivalent = 0
    for r in results:
        area: Area = r["area"]
        for s in r["survivors"]:
            becomes = changed_line(s["diff"])
            s["equivalent"] = (EQUIVALENT.get((area.module, s["text"], s["operator"], becomes))
                               or EQUIVALENT.get((area.module, s["text"], s["operator"])))
        mutants = r["killed"] + r["survived"]  # incompetent: the test command could not run at all
        equivalent = sum(1 for s in r["survivors"] if s["equivalent"])
        score = r["killed"] / max(1, mutants - equivalent)
        total_killed += r["killed"]
        total_mutants += mutants
        total_equivalent += equivalent
        spans = ", ".join(f"{a}-{b}" for a, b in r["ranges"])
        took = f"{r['seconds']:.0f}" + (" (reused)" if r.get("reused") else "")
        rows.append(f"| {area.name} | `{area.module}` lines {spans} | {', '.join(f'`{t}`' for t in area.tests)} | "
                    f"{mutants} | {r['killed']} | {r['survived'] - equivalent} | {equivalent} | {r['incompetent']} | "
                    f"{score:.1%} | {took} |")
        for s in r["survivors"]:
            verdict = f"equivalent: {s['equivalent']}" if s["equivalent"] else "**not caught**"
            listed.append(f"| {area.name} | {s['line']} | {s['operator']} | `{s['text'][:90]}` | {verdict} |")
    score = total_killed / max(1, total_mutants - total_equivalent)
    full_run = len(areas) == len(AREAS)
    target = (Target("Mutants killed, every area together", "≥ 85% (equivalent mutants set aside)",
                     f"{score:.1%} ({total_killed} of {total_mutants - total_equivalent})", status(score >= 0.85),
                     why=f"{score:.1%}: the survivors below are changes no test notices")
              if full_run else
              Target("Mutants killed, every area together", "≥ 85%", None, "not measured",
                     why=f"only {', '.join(a.name for a in areas)} ran; not "
                         f"{', '.join(a.name for a in AREAS if a not in areas)}"))
    body = [f"Measured by `python benchmarks/mutation.py` (cosmic-ray): {measured_stamp}.", "",
            "Rule: one run; every mutant of the listed functions' lines, each against its area's unit tests "
            "(`pytest -x`); score = killed / (killed + survived − judged equivalent). Operators: cosmic-ray's, "
            "one replacement per binary and comparison operator (`+`→`-`, `<`→`<=`, `==`→`!=`, ...). Incompetent (not in the score): the test "
            "command could not be started for that mutant. s: seconds of mutants run; \"reused\": the "
            "area's inputs (module, tests, functions, operators) are byte-identical to a run kept in "
            "benchmarks/out/mutation/.", "",
            "| area | mutated | tests | mutants | killed | survived | equivalent | incompetent | score | s |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    if listed:
        body += ["Survivors:", "", "| area | line | operator | line's text | verdict |", "|---|---|---|---|---|",
                 *listed, ""]
    body += targets_table([target])
    print("\n".join(body))
    if full_run or args.write:  # a partial run replaces the section only when asked to
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
