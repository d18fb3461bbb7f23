"""glibc's hugetlb tunable: merged into the environment without clobbering the user's,
effective in a child process, and passed by bench_all to every benchmark it starts."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from diffmas_jax.host_malloc import HUGETLB, hugetlb_setting, with_hugetlb, with_hugetlb_value

REPO = Path(__file__).resolve().parents[1]


def test_with_hugetlb_keeps_other_tunables_and_the_users_choice():
    assert with_hugetlb({})["GLIBC_TUNABLES"] == HUGETLB
    assert with_hugetlb({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    off = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "PATH": "/bin"}
    assert with_hugetlb(off) == off
    assert hugetlb_setting(with_hugetlb({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})) == "1"
    assert hugetlb_setting(off) == "0" and hugetlb_setting({}) is None
    forced = with_hugetlb_value({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2"}, "0")
    assert forced["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"
    assert with_hugetlb_value({}, "1")["GLIBC_TUNABLES"] == HUGETLB


# A child mallocs 256 MiB outside numpy (which asks for huge pages itself), touches it and
# reports how much of its anonymous memory the kernel backs with huge pages.
PROBE = r"""
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
p = libc.malloc(ctypes.c_size_t(n))
ctypes.memset(p, 1, n)
kb = [int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")][0]
print(kb)
"""


def _thp_mode():
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def _huge_kb(env):
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 35)
                    or _thp_mode() not in ("madvise", "always") or not Path("/proc/self/smaps_rollup").exists(),
                    reason="needs glibc >= 2.35 and transparent huge pages (Linux)")
def test_the_tunable_gives_a_child_process_huge_pages():
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    with_it = _huge_kb(with_hugetlb(base))
    assert with_it >= 128 << 10  # at least half the block in 2 MiB pages
    if _thp_mode() == "madvise":  # without the tunable glibc never asks, so the kernel gives none
        assert _huge_kb(base) < 32 << 10


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 35)
                    or _thp_mode() != "madvise", reason="needs glibc >= 2.35 and THP in madvise mode (Linux)")
def test_bench_kernels_times_fresh_memory_under_each_setting():
    """The memory floor runs one fresh process per setting, and each really gets its pages:
    one fault per 4 KiB page without huge pages, far fewer with them."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_kernels import memory_touch_floor
    rows = memory_touch_floor(0.256, repeats=2, order="10")
    by = {r["hugetlb"]: r for r in rows}
    assert [r["hugetlb"] for r in rows] == ["1", "0"] and all(r["first_wall_s"] > 0 and r["later_wall_s"] > 0 for r in rows)
    pages = 256_000_000 // 4096
    assert by["0"]["first_faults"] >= 0.9 * pages and by["0"]["later_faults"] >= 0.9 * pages
    assert by["1"]["later_faults"] < 0.5 * pages  # as above: at least half in 2 MiB pages


def test_bench_all_starts_every_script_with_the_tunable(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_all
    started = []

    def fake_run(cmd, cwd=None, env=None):
        started.append((Path(cmd[1]).stem, env.get("GLIBC_TUNABLES")))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench_all.subprocess, "run", fake_run)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    bench_all.main(["--out", str(tmp_path / "a"), "--only", "bench_model,bench_kernels", "--max-wait", "0"])
    assert started == [("bench_model", HUGETLB), ("bench_kernels", HUGETLB)]
    started.clear()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    bench_all.main(["--out", str(tmp_path / "b"), "--only", "bench_train"])
    assert started == [("bench_train", "glibc.malloc.hugetlb=0")]
