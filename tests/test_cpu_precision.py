"""The CPU as a device: train.amp=auto picks bf16 autocast where the CPU has native bf16
(AMX / avx512_bf16 under ATen's AVX512 kernels) and fp32 elsewhere, the run header says which
and why, and the CUDA choice is unchanged. The CPU's features are faked, so the tests do not
depend on the machine they run on."""

from __future__ import annotations

import json

import pytest
import torch

from visionzoo.cli import main
from visionzoo.runtime import cpu_bf16_isa, precision_label, resolve_amp

CPU = torch.device("cpu")


def fake_cpu(monkeypatch, capability: str, avx512_bf16: bool, amx: bool = False) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("capability, avx512_bf16, amx, isa", [
    ("AVX512", True, False, "avx512_bf16"),
    ("AVX512", True, True, "amx_bf16"),
    ("AVX512", False, False, None),  # AVX512 without bf16 (Skylake-X, Zen 4 without it exposed)
    ("AVX2", True, False, None),  # ATEN_CPU_CAPABILITY=avx2 asked for the older kernels
    ("DEFAULT", True, True, None),
])
def test_auto_is_bf16_only_with_native_bf16(monkeypatch, capability, avx512_bf16, amx, isa) -> None:
    fake_cpu(monkeypatch, capability, avx512_bf16, amx)
    assert cpu_bf16_isa() == isa
    want = torch.bfloat16 if isa else None
    assert resolve_amp("auto", CPU) is want
    assert precision_label(want, CPU) == (f"bf16 ({isa})" if isa else "fp32 (no native bf16)")
    # Explicit choices are kept whatever the CPU has.
    assert resolve_amp("none", CPU) is None and resolve_amp("bf16", CPU) is torch.bfloat16


def test_explicit_bf16_without_native_support_is_labelled_emulated(monkeypatch) -> None:
    fake_cpu(monkeypatch, "AVX2", False)
    assert precision_label(torch.bfloat16, CPU) == "bf16 (emulated: no avx512_bf16/AMX)"


def test_cuda_choice_is_unchanged(monkeypatch) -> None:
    fake_cpu(monkeypatch, "DEFAULT", False)  # the host CPU plays no part on a GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda", 0)
    assert resolve_amp("auto", cuda) is torch.bfloat16 and precision_label(torch.bfloat16, cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", cuda) is None


@pytest.mark.parametrize("native", [True, False])
def test_run_header_and_results_name_the_cpu_precision(monkeypatch, fmnist_dir, tmp_path, capsys, native) -> None:
    fake_cpu(monkeypatch, "AVX512", native)
    run = tmp_path / "run"
    args = ["train", "fashion_mnist", "--data", str(fmnist_dir), "--output", str(run), "--epochs", "1",
            "--workers", "0", "--device", "cpu", "data.batch_size=32", "train.max_steps_per_epoch=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("visionzoo: training"))
    assert ("1 × cpu bf16 (avx512_bf16)," if native else "1 × cpu fp32 (no native bf16),") in header  # then its threads
    results = json.loads((run / "results.json").read_text())
    assert results["precision"] == ("bf16" if native else "fp32")


@pytest.mark.parametrize("capability, simdlen", [("DEFAULT", 1), ("AVX2", 256), ("AVX512", None)])
def test_compiled_kernels_follow_the_instruction_set_aten_was_told(monkeypatch, capability, simdlen):
    """Inductor detects the CPU itself: under ATEN_CPU_CAPABILITY=default it emitted at::vec code
    its headers could not compile (test_train_cli's compiled run failed); the vector width now
    follows ATen's choice, and is left to inductor on a CPU used as it is and off the CPU."""
    import torch._inductor.config as inductor_config

    from visionzoo.runtime import compile_module

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    net = torch.nn.Linear(2, 2)
    with inductor_config.patch({"cpp.simdlen": None}):  # put back afterwards
        compiled = compile_module(net, torch.device("cpu"))
        assert inductor_config.cpp.simdlen == simdlen and compiled is not net
    with inductor_config.patch({"cpp.simdlen": None}):
        compile_module(net, torch.device("cuda"))  # no CUDA needed: nothing runs
        assert inductor_config.cpp.simdlen is None
