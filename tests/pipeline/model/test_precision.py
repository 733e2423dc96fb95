"""The inference dtype: chosen from what the device can do, said aloud, refused where it would be emulated."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pipeline.model.precision import native_bf16_cpu_features, resolve_precision

# the capabilities torch reports on x86 CPUs with and without native bf16 matrix instructions
WITHOUT_BF16 = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}
WITH_AMX = {**WITHOUT_BF16, "amx_bf16": True, "amx_tile": True}
WITH_AVX512_BF16 = {**WITHOUT_BF16, "avx512_bf16": True}


def test_bfloat16_is_refused_on_a_cpu_without_native_bf16_and_the_error_says_why():
    with pytest.raises(ValueError, match="bfloat16 refused: this CPU has no native bf16 matrix support") as err:
        resolve_precision("bfloat16", "cpu", WITHOUT_BF16)
    assert "float32 or auto" in str(err.value)


def test_auto_chooses_bf16_only_where_the_cpu_multiplies_it_natively_and_says_what_it_chose():
    fp32 = resolve_precision("auto", "cpu", WITHOUT_BF16)
    assert fp32.dtype == torch.float32 and fp32.reason.startswith("auto chose float32: this CPU has no native bf16")
    for caps, feature in ((WITH_AMX, "amx_bf16"), (WITH_AVX512_BF16, "avx512_bf16")):
        p = resolve_precision("auto", "cpu", caps)
        assert p.dtype == torch.bfloat16 and p.name == "bfloat16" and feature in p.reason
    assert resolve_precision("bfloat16", "cpu", WITH_AMX).dtype == torch.bfloat16
    assert resolve_precision("float32", "cpu", WITH_AMX).dtype == torch.float32  # as set, whatever the CPU has


def test_this_cpus_features_are_read_at_run_time_and_agree_with_the_kernel():
    """torch's detection (cpuinfo) against the flags Linux reports for this CPU, an independent reading."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or torch.cpu.get_capabilities().get("architecture") != "x86_64":
        pytest.skip("the kernel's CPU flags are read from /proc/cpuinfo on x86 Linux")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    assert set(native_bf16_cpu_features()) == {"avx512_bf16", "amx_bf16"} & flags
    auto = resolve_precision("auto", "cpu")
    assert auto.dtype == (torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & flags else torch.float32)


def test_unknown_inference_settings_are_refused_by_the_config_before_anything_runs():
    from pipeline.config import EvaluateConfig, ServeConfig

    for section in (EvaluateConfig, ServeConfig):
        with pytest.raises(ValueError, match="inference_dtype"):
            section(inference_dtype="bf16")
        assert section().inference_dtype == "float32"
        with pytest.raises(ValueError, match="compile_decode_max_batch"):
            section(compile_decode_max_batch=-1)
        assert section().compile_decode_max_batch == 0  # off: compiling costs a minute per batch size


def test_a_student_loads_in_the_resolved_dtype_answers_and_logs_the_choice(registered_student, caplog):
    from pipeline.student import Student

    choice = "auto" if native_bf16_cpu_features() else "float32"
    with caplog.at_level(logging.INFO, logger="pipeline.model.precision"):
        student = Student(registered_student.directory, "cpu", choice)
    want = resolve_precision(choice, "cpu").dtype
    assert {p.dtype for p in student.model.parameters()} == {want}
    assert f"runs in {student.precision.name}" in caplog.text
    (answer,) = student.answer(["What is 2 + 3?"], max_new_tokens=4)
    assert answer.completion_tokens >= 1
    if not native_bf16_cpu_features():
        with pytest.raises(ValueError, match="bfloat16 refused"):
            Student(registered_student.directory, "cpu", "bfloat16")
