"""Benchmark pacing: other work on the CPUs measured from /proc/stat, not the lagging load average."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine_load import BUSY_CORES, busy_cores, busy_note, cpu_jiffies, cpu_model, wait_until_quiet  # noqa: E402


def test_cpu_jiffies_reads_busy_and_total(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert cpu_jiffies(stat) == (100 + 5 + 50 + 3 + 2 + 10, 990)
    stat.write_text("intr 1 2 3\n")
    assert cpu_jiffies(stat) is None
    assert cpu_jiffies(tmp_path / "missing") is None
    assert busy_cores(0.01, stat=tmp_path / "missing") is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc/stat")
def test_busy_cores_sees_a_spinning_process():
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 6: pass"])
    try:
        time.sleep(0.5)
        busy = busy_cores(1.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and BUSY_CORES <= busy


def test_busy_note_prefers_the_sample_to_the_load_average():
    # the load average right after a previous script: high, while nothing else runs
    assert busy_note({"cpu_count": 2, "cpu_busy_start": 0.05, "load_avg_start": [2.06, 2.0, 1.8]}) is None
    note = busy_note({"cpu_count": 2, "cpu_busy_start": 1.2, "load_avg_start": [0.1, 0.1, 0.1]})
    assert note.startswith("**Busy machine** (1.20 of 2 cores busy")
    # runs recorded without a sample fall back to the load average
    assert "load 2.1 on 2 CPUs" in busy_note({"cpu_count": 2, "load_avg_start": [2.06, 2.0, 1.8]})
    assert busy_note({"cpu_count": 2, "cpu_busy_start": None, "load_avg_start": [0.5, 0.5, 0.5]}) is None


def test_wait_until_quiet_waits_then_gives_up():
    samples = iter([1.5, 0.9, 0.1, 5.0])
    logged = []
    busy, waited = wait_until_quiet(60, threshold=0.25, log=logged.append, sample=lambda s: next(samples))
    assert busy == 0.1 and len(logged) == 2 and waited < 60
    busy, waited = wait_until_quiet(0.05, threshold=0.25, log=logged.append,
                                    sample=lambda s: (time.sleep(0.03), 2.0)[1])
    assert busy == 2.0 and waited >= 0.05  # still busy: it stops waiting after max_wait_s
    assert wait_until_quiet(5, sample=lambda s: None) == (None, 0.0)  # no /proc/stat: no wait


def test_cpu_model_names_the_core_generation(tmp_path):
    """"model name" alone read "AMD EPYC" on both the Zen 4 and the Zen 5 hosts of this VM;
    the family and model numbers tell them apart (the first processor's block is read)."""
    info = tmp_path / "cpuinfo"

    def block(vendor, family, model, name="AMD EPYC"):
        return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
                f"model name\t: {name}\nflags\t\t: fpu avx512f\n\n")

    info.write_text(block("AuthenticAMD", 26, 2) + block("AuthenticAMD", 25, 17))
    assert cpu_model(info) == "AMD EPYC (Zen 5: family 26, model 2; AVX-512)"
    info.write_text(block("AuthenticAMD", 25, 17))
    assert cpu_model(info) == "AMD EPYC (Zen 4: family 25, model 17; AVX-512)"
    info.write_text(block("AuthenticAMD", 25, 1))
    assert cpu_model(info) == "AMD EPYC (Zen 3: family 25, model 1; AVX-512)"
    info.write_text(block("GenuineIntel", 6, 143, name="Intel(R) Xeon(R) Platinum 8480+"))
    assert cpu_model(info) == "Intel(R) Xeon(R) Platinum 8480+ (family 6, model 143; AVX-512)"
    # The matmul instruction sets, widest first; AVX2 only where AVX-512 is absent.
    amx = "fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16"
    info.write_text(block("GenuineIntel", 6, 167, name="Intel(R) Xeon(R) Processor").replace("fpu avx512f", amx))
    assert cpu_model(info) == "Intel(R) Xeon(R) Processor (family 6, model 167; AMX-BF16, AVX512-BF16, AVX-512)"
    info.write_text(block("AuthenticAMD", 23, 49).replace("fpu avx512f", "fpu avx avx2 fma"))
    assert cpu_model(info) == "AMD EPYC (Zen/Zen 2: family 23, model 49; AVX2)"
    info.write_text(block("AuthenticAMD", 23, 49).replace("fpu avx512f", "fpu sse2"))
    assert cpu_model(info) == "AMD EPYC (Zen/Zen 2: family 23, model 49)"
    info.write_text("processor\t: 0\nmodel name\t: some cpu\n")
    assert cpu_model(info) == "some cpu"
    info.write_text("processor\t: 0\nvendor_id\t: ARM\n")
    assert cpu_model(info) is None
    assert cpu_model(tmp_path / "missing") is None
