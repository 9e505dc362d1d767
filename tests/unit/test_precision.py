"""``precision: auto``: the decision for each kind of hardware, with the capabilities injected.

The machine's own CPU decides nothing here: each case passes the text of a
``/proc/cpuinfo`` (and whether torch's oneDNN may use bf16) or a ``Hardware`` directly.
"""

from __future__ import annotations

import pytest

from branchout.core.precision import (
    Hardware,
    agreed,
    cpu_hardware,
    decide,
    predict,
)

pytestmark = pytest.mark.unit


def cpuinfo(flags: str, name: str = "AMD EPYC 9R14", key: str = "flags") -> str:
    """Two cores of a /proc/cpuinfo; only the first core's flags are read."""
    core = f"processor\t: {{n}}\nvendor_id\t: AuthenticAMD\nmodel name\t: {name}\n{key}\t\t: {flags}\n\n"
    return core.format(n=0) + core.format(n=1)


AVX2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c"
ZEN4 = AVX2 + " avx512f avx512bw avx512vl avx512_bf16 avx512_vnni"
SKYLAKE_X = AVX2 + " avx512f avx512bw avx512vl avx512dq"  # AVX-512, but no bf16 instructions
SAPPHIRE = AVX2 + " avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8"
GRAVITON3 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp sve bf16 i8mm"
GRAVITON2 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp"


@pytest.mark.parametrize(("flags", "key", "native", "why"), [
    (AVX2, "flags", False, "has no AVX512-BF16 or AMX"),
    (SKYLAKE_X, "flags", False, "has no AVX512-BF16 or AMX"),
    (ZEN4, "flags", True, "has AVX512-BF16"),
    (SAPPHIRE, "flags", True, "has AVX512-BF16"),
    ("fpu avx2 amx_bf16 amx_tile", "flags", True, "has AMX"),
    (GRAVITON3, "Features", True, "has BF16"),
    (GRAVITON2, "Features", False, "has no AVX512-BF16 or AMX"),
])
def test_a_cpu_is_native_bf16_only_with_the_instructions(flags, key, native, why):
    hw = cpu_hardware(cpuinfo(flags, key=key), onednn_bf16=True)
    assert (hw.device, hw.bf16, hw.why, hw.name) == ("cpu", native, why, "AMD EPYC 9R14")


def test_a_cpu_whose_onednn_may_not_use_bf16_is_not_native(monkeypatch):
    # ONEDNN_MAX_CPU_ISA=AVX2 makes an AVX512-BF16 CPU emulate bf16 as an AVX2 one does
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    hw = cpu_hardware(cpuinfo(ZEN4), onednn_bf16=False)
    assert not hw.bf16
    assert hw.why == "has AVX512-BF16 but torch's oneDNN may not use it (ONEDNN_MAX_CPU_ISA=AVX2)"
    assert decide("auto", hw).used == "fp32"


def test_a_machine_without_proc_cpuinfo_does_not_assume_bf16():
    hw = cpu_hardware("", onednn_bf16=True)  # macOS, Windows: nothing says it is native
    assert not hw.bf16 and decide("auto", hw).used == "fp32"


@pytest.mark.parametrize(("hw", "used", "reason"), [
    (Hardware("cuda", "NVIDIA H100 80GB HBM3", True, "supports bf16 (compute capability 9.0)"), "bf16",
     "GPU NVIDIA H100 80GB HBM3 supports bf16 (compute capability 9.0)"),
    (Hardware("cuda", "Tesla V100-SXM2-32GB", False, "has no bf16 (compute capability 7.0)"), "fp16",
     "GPU Tesla V100-SXM2-32GB has no bf16 (compute capability 7.0): fp16 with loss scaling"),
    (Hardware("cpu", "AMD EPYC 9R14", True, "has AVX512-BF16"), "bf16", "CPU AMD EPYC 9R14 has AVX512-BF16"),
    (Hardware("cpu", "AMD EPYC 7B13", False, "has no AVX512-BF16 or AMX"), "fp32",
     "CPU AMD EPYC 7B13 has no AVX512-BF16 or AMX: bf16 would be emulated, many times slower"),
])
def test_auto_follows_the_hardware(hw, used, reason):
    p = decide("auto", hw)
    assert (p.requested, p.used, p.reason, p.warning) == ("auto", used, reason, None)
    assert p.line() == f"auto → {used} ({reason})"


def test_an_explicit_setting_wins_and_bf16_where_it_is_emulated_warns():
    avx2 = Hardware("cpu", "AMD EPYC 7B13", False, "has no AVX512-BF16 or AMX")
    zen4 = Hardware("cpu", "AMD EPYC 9R14", True, "has AVX512-BF16")
    v100 = Hardware("cuda", "Tesla V100", False, "has no bf16 (compute capability 7.0)")
    slow = decide("bf16", avx2)
    assert slow.used == "bf16"  # the user's choice stands
    assert slow.warning == ("precision bf16 on CPU AMD EPYC 7B13, which has no AVX512-BF16 or AMX: torch emulates "
                            "bf16 there, many times slower than fp32 (set deepspeed.precision: auto or fp32)")
    assert "slower than fp16" in decide("bf16", v100).warning
    assert decide("bf16", zen4).warning is None
    for requested in ("fp32", "fp16"):
        p = decide(requested, v100)
        assert (p.used, p.reason, p.warning) == (requested, "as configured", None)
    assert decide("fp32", avx2).warning is None


def test_the_ranks_of_one_job_take_bf16_only_if_all_have_it():
    zen4 = Hardware("cpu", "AMD EPYC 9R14", True, "has AVX512-BF16")
    assert agreed(zen4, True) == zen4
    mixed = agreed(zen4, False)
    assert not mixed.bf16 and decide("auto", mixed).used == "fp32"
    a100 = Hardware("cuda", "A100", True, "supports bf16")
    assert decide("auto", agreed(a100, False)).used == "fp16"


def test_the_plan_predicts_what_it_can_know(monkeypatch):
    import branchout.core.precision as precision

    avx2 = Hardware("cpu", "AMD EPYC 7B13", False, "has no AVX512-BF16 or AMX")
    monkeypatch.setattr(precision, "cpu_hardware", lambda: avx2)
    monkeypatch.delenv("BRANCHOUT_SIMULATE_GPUS", raising=False)
    assert predict("auto", False, None, embedded=True).used == "fp32"  # this machine's CPU
    assert predict("auto", False, None, embedded=False) is None  # a remote cluster's CPUs decide
    assert predict("bf16", False, None, embedded=False).used == "bf16"
    assert predict("auto", True, "H100-80GB", embedded=False).used == "bf16"  # by GPU type
    assert predict("auto", True, "T4-16GB", embedded=False).used == "fp16"
    assert predict("auto", True, "V100-32GB", embedded=True).used == "fp16"
    assert predict("auto", True, None, embedded=False) is None
    # simulated GPUs are scheduling tokens; the job trains on this machine's CPU
    monkeypatch.setenv("BRANCHOUT_SIMULATE_GPUS", "1")
    assert predict("auto", True, "H100-80GB", embedded=True).used == "fp32"


@pytest.mark.parametrize(("cpu", "line"), [
    (Hardware("cpu", "AMD EPYC 7B13", False, "has no AVX512-BF16 or AMX"),
     "DeepSpeed ZeRO-2, fp32 (auto: CPU AMD EPYC 7B13 has no AVX512-BF16 or AMX: bf16 would be emulated, "
     "many times slower)"),
    (Hardware("cpu", "AMD EPYC 9R14", True, "has AVX512-BF16"),
     "DeepSpeed ZeRO-2, bf16 (auto: CPU AMD EPYC 9R14 has AVX512-BF16)"),
])
def test_the_pretrain_line_of_the_plan_says_the_precision_and_why(monkeypatch, cpu, line):
    import io

    from rich.console import Console

    import branchout.core.precision as precision
    from branchout.core.spec import PipelineSpec
    from branchout.orchestrator.config.plan import build_plan
    from branchout.orchestrator.run.display import print_plan

    from conftest import TINY

    monkeypatch.setattr(precision, "cpu_hardware", lambda: cpu)
    monkeypatch.delenv("BRANCHOUT_SIMULATE_GPUS", raising=False)
    spec = PipelineSpec.model_validate({**TINY, "pretrain": {**TINY["pretrain"], "deepspeed": {"zero_stage": 2}}})
    plan = build_plan(spec)
    out = io.StringIO()
    print_plan(Console(file=out, width=400), plan)
    text = out.getvalue()
    assert line in text
    assert "warning" not in text
    used = "bf16" if cpu.bf16 else "fp32"
    assert all(j.engine.endswith(used) or j.engine.endswith(f"in {used}") for j in plan.jobs), plan.jobs
    # an explicit bf16 on a CPU without it is kept, with one warning line
    spec = PipelineSpec.model_validate({**TINY, "pretrain": {**TINY["pretrain"],
                                                             "deepspeed": {"zero_stage": 2, "precision": "bf16"}}})
    out = io.StringIO()
    print_plan(Console(file=out, width=400), build_plan(spec))
    warnings = [ln for ln in out.getvalue().splitlines() if "warning" in ln]
    assert warnings == ([] if cpu.bf16 else [
        "  warning: pretrain: precision bf16 on CPU AMD EPYC 7B13, which has no AVX512-BF16 or AMX: torch emulates "
        "bf16 there, many times slower than fp32 (set deepspeed.precision: auto or fp32)"])
