"""Run untrusted Python (model-written code plus its tests) in a contained child.

Layers, strongest first:
1. As root: the child drops to a dedicated, otherwise unused uid with no groups
   and no_new_privs, so it cannot write anywhere but its own temporary directory
   (and world-writable dirs, which are swept afterwards), cannot signal other
   users' processes, and RLIMIT_NPROC (not enforced for root) caps fork bombs.
   If the interpreter lives somewhere that uid cannot read (e.g. under /root), the
   child first tries a private mount namespace: an empty tmpfs over each closed
   directory with the interpreter's own tree bound back read-only, private
   world-writable dirs (/tmp, /var/tmp, /dev/shm, /run/lock, ...), and a tmpfs
   working directory capped at ``disk_mb``. Only
   where mounts are not permitted does it keep CAP_DAC_READ_SEARCH (read-only
   access past permissions) so imports still work.
2. A fresh network namespace (no interfaces) when unshare is permitted.
3. rlimits: address space, CPU, processes, file size, open files, no core files.
4. A prelude that disables process control, subprocesses, sockets and file
   deletion outside the working directory (mistake-proofing, not a security
   boundary on its own).
5. The parent kills the child's whole process group, and every process of the
   dedicated uid, on timeout and after exit; output is read through a capped buffer.

Limits and rlimits are applied by the child's own bootstrap before any user code
runs rather than in a preexec_fn, which is unsafe in a multi-threaded parent.

"passed" means the code ran to its end: the bootstrap writes a random nonce after
the user code returns, so sys.exit(0) or os._exit(0) before the tests count as
failed. This guards against mistakes, not against code written to fool it.
"""
from __future__ import annotations

import functools
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

STATUSES = ("passed", "failed", "timeout", "memory", "killed", "error")
_SETUP_FAILED_RC = 97
_UID_RANGE = (2_000_000, 2_900_000)  # dedicated uids for sandboxes (root only)
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


@dataclass
class SandboxResult:
    status: str          # one of STATUSES
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ------------------------------------------------------------------ child bootstrap
# Runs as `python -I -c BOOTSTRAP CONFIG_JSON`; reads "nonce\n" + source on stdin.
_BOOTSTRAP = r'''
import json, os, sys
cfg = json.loads(sys.argv[1])
nonce = sys.stdin.readline().strip()
source = sys.stdin.read()

def _setup():
    import ctypes, resource, signal
    libc = ctypes.CDLL(None, use_errno=True)
    if cfg["unshare_net"]:
        libc.unshare(0x40000000)  # CLONE_NEWNET; failure just means no netns
    for name, value in cfg["limits"].items():
        res = getattr(resource, name)
        resource.setrlimit(res, (value, value) if name != "RLIMIT_CPU" else (value, value + 1))
    uid = cfg["uid"]
    read_cap = cfg["read_cap"]
    if cfg["mounts"] is not None:
        try:
            _mounts(libc, cfg["mounts"], uid)
            read_cap = False  # the interpreter is reachable without reading past permissions
        except OSError as exc:
            if cfg["mounts"].get("required"):
                raise
            pass  # no mount namespace here: the uid drop keeps read-only access (see containment())
    if uid is not None:
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: keep caps across setuid...
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(uid)
        class Hdr(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        class Data(ctypes.Structure):
            _fields_ = [("eff", ctypes.c_uint32), ("prm", ctypes.c_uint32), ("inh", ctypes.c_uint32)]
        data = (Data * 2)()
        if read_cap:  # ...but only CAP_DAC_READ_SEARCH (2), if still needed; else none
            data[0].eff = data[0].prm = 1 << 2
        if libc.capset(ctypes.byref(Hdr(0x20080522, 0)), data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: no setuid binaries
            raise OSError(ctypes.get_errno(), "no_new_privs failed")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversize writes raise instead of killing

def _mounts(libc, plan, uid):
    """A private mount namespace: directories the sandbox uid could not read anyway are
    covered by empty tmpfs (only the interpreter's own directories are bound back,
    read-only), world-writable scratch dirs (/tmp, /run/lock, ...) are private and small, and the
    working directory is a size-limited tmpfs. All of it vanishes with the sandbox.
    Any failure undoes what was mounted and raises OSError."""
    import ctypes
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
    done = []
    def mount(src, target, fstype, flags, data=None):
        enc = lambda x: None if x is None else os.fsencode(x)
        if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mount {fstype or src} on {target}: {os.strerror(e)}")
        if not flags & MS_REMOUNT:
            done.append(target)
    # CLONE_NEWNS | CLONE_NEWIPC: own mounts, own SysV IPC objects
    if libc.unshare(0x00020000 | 0x08000000) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unshare: {os.strerror(e)}")
    try:
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        done.clear()  # a propagation change, nothing to undo
        for anchor, keeps in plan["hide"]:
            fds = [os.open(k, os.O_PATH) for k in keeps]
            mount("tmpfs", anchor, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
            for k, fd in zip(keeps, fds):
                os.makedirs(k, 0o755, exist_ok=True)
                mount(f"/proc/self/fd/{fd}", k, None, MS_BIND | MS_REC)
                mount(None, k, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
                os.close(fd)
        for d in plan["scratch"]:
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={plan['scratch_mb']}m")
        work = plan["workdir"]
        os.makedirs(work, 0o700, exist_ok=True)
        owner = f",uid={uid},gid={uid}" if uid is not None else ""
        mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=700,size={plan['disk_mb']}m{owner}")
        os.chdir(work)
    except BaseException:
        for target in reversed(done):
            libc.umount2(os.fsencode(target), 2)  # MNT_DETACH
        os.chdir(plan["workdir"])
        raise

def _guard(root):
    """Disable calls that act outside this process and directory."""
    import builtins, os, shutil, subprocess, socket
    def deny(name):
        def blocked(*a, **k):
            raise PermissionError(f"{name} is disabled in the sandbox")
        return blocked
    def inside(path, dir_fd=None):
        try:
            path = os.fsdecode(os.fspath(path))
            if dir_fd is not None and not os.path.isabs(path):  # shutil.rmtree uses dir_fd
                path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
            real = os.path.realpath(path)
        except (TypeError, OSError):
            return False
        return real == root or real.startswith(root + os.sep)
    def local_only(name, fn, n_paths=1):
        def checked(*a, **k):
            fds = [k.get("dir_fd"), k.get("src_dir_fd", k.get("dir_fd")), k.get("dst_dir_fd", k.get("dir_fd"))]
            paths = [(p, fds[0] if n_paths == 1 else fds[1 + i]) for i, p in enumerate(a[:n_paths])]
            paths += [(k[x], k.get("dir_fd")) for x in ("src", "dst", "path") if x in k]
            for p, fd in paths:
                if isinstance(p, int) or not inside(p, fd):
                    raise PermissionError(f"{name} outside the working directory is disabled in the sandbox")
            return fn(*a, **k)
        return checked
    for name in ("kill", "killpg", "system", "fork", "forkpty", "setsid", "setpgid", "setpgrp",
                 "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setgroups",
                 "chroot", "fchdir", "fchmod", "fchown", "lchown", "chown", "popen",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp",
                 "spawnvpe", "posix_spawn", "posix_spawnp", "plock"):
        if hasattr(os, name):
            setattr(os, name, deny(f"os.{name}"))
    for name, n in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1),
                    ("rename", 2), ("renames", 2), ("replace", 2), ("truncate", 1),
                    ("chmod", 1), ("link", 2), ("symlink", 2)):
        if hasattr(os, name):
            setattr(os, name, local_only(f"os.{name}", getattr(os, name), n))
    shutil.rmtree = local_only("shutil.rmtree", shutil.rmtree)
    shutil.move = local_only("shutil.move", shutil.move, 2)
    shutil.chown = deny("shutil.chown")
    # keep classes as classes so modules that subclass them still import
    class NoPopen(subprocess.Popen):
        def __init__(self, *a, **k):
            raise PermissionError("subprocess is disabled in the sandbox")
    class NoSocket(socket.socket):
        def __init__(self, *a, **k):
            raise PermissionError("sockets are disabled in the sandbox")
    subprocess.Popen = NoPopen
    for name in ("call", "check_call", "check_output", "run", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, deny(f"subprocess.{name}"))
    socket.socket = socket.SocketType = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, deny(f"socket.{name}"))
    builtins.help = deny("help")

try:
    _setup()
    _guard(os.path.realpath(os.getcwd()))
except BaseException as exc:
    sys.stderr.write(f"sandbox setup failed: {exc!r}\n")
    sys.stderr.flush()
    os._exit(cfg["setup_failed_rc"])
del _setup, _guard

def _run(source, nonce):
    import linecache, types
    linecache.cache["<sandbox>"] = (len(source), None, source.splitlines(True), "<sandbox>")
    # Imported, not run as a script (as HumanEval's and EvalPlus's harnesses do), so an
    # `if __name__ == "__main__":` demo reading input() is skipped; the module is
    # registered under both names so pickling classes defined by the code works.
    main = types.ModuleType("solution")
    main.__file__ = "<sandbox>"
    sys.modules["__main__"] = sys.modules["solution"] = main
    sys.argv = [""]  # not the sandbox's config (unittest.main() parses argv)
    exec(compile(source, "<sandbox>", "exec"), main.__dict__)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, ("\n" + nonce + "\n").encode())

_args = (source, nonce)
del source, nonce, cfg
_run(*_args)
'''


# ------------------------------------------------------------------ parent helpers

def _other_can_read(path: str) -> bool:
    """Whether an unrelated uid can traverse to and read `path`."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        try:
            st = os.stat(os.sep.join(parts[:i]) or os.sep)
        except OSError:
            return False
        if not st.st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


@functools.lru_cache(maxsize=None)
def _interpreter_paths() -> tuple[str, ...]:
    """What the child's interpreter must be able to read: stdlib, binary, site-packages."""
    import sysconfig
    paths = {os.path.realpath(os.path.dirname(os.__file__)), os.path.realpath(sys.executable)}
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p and os.path.isdir(p):
            paths.add(os.path.realpath(p))
    return tuple(sorted(paths))


@functools.lru_cache(maxsize=None)
def _interpreter_needs_read_cap() -> bool:
    return not all(_other_can_read(p) for p in _interpreter_paths())


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _first_closed_dir(path: str) -> str | None:
    """The outermost directory on `path` that an unrelated uid may not traverse."""
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        d = os.sep.join(parts[:i])
        try:
            st = os.stat(d)
        except OSError:
            return None
        if os.path.isdir(d) and not st.st_mode & 0o001:
            return d
    return None


def _readable_below(top: str, path: str) -> bool:
    """Whether an unrelated uid that can reach `top` can read `path` below it."""
    rel = os.path.relpath(path, top)
    d = top
    for part in [] if rel == "." else rel.split(os.sep):
        try:
            if not os.stat(d).st_mode & 0o001:
                return False
        except OSError:
            return False
        d = os.path.join(d, part)
    try:
        st = os.stat(d)
    except OSError:
        return False
    return bool(st.st_mode & 0o004) and (not os.path.isdir(d) or bool(st.st_mode & 0o001))


@functools.lru_cache(maxsize=1)
def _scratch_dirs() -> tuple[str, ...]:
    """World-writable directories near the root (/tmp, /var/tmp, /dev/shm, /run/lock, ...):
    the only places the sandbox uid can write outside its working directory. Found
    three levels deep, once per process; /proc and /sys are skipped."""
    found, level = [], ["/"]
    for _ in range(3):
        below = []
        for top in level:
            try:
                entries = list(os.scandir(top))
            except OSError:
                continue
            for e in entries:
                if e.path in ("/proc", "/sys") or not e.is_dir(follow_symlinks=False):
                    continue
                try:
                    if e.stat(follow_symlinks=False).st_mode & 0o002:
                        found.append(e.path)
                        continue
                except OSError:
                    continue
                below.append(e.path)
        level = below
    return tuple(sorted(found))


def _mount_plan(workdir: str, disk_mb: int, scratch_mb: int = 64) -> dict | None:
    """Private mounts for a root-run sandbox (see the bootstrap's _mounts), or None if
    the interpreter could not be reached without CAP_DAC_READ_SEARCH anyway."""
    needed = list(_interpreter_paths())
    roots = sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}, key=len)
    hide: dict[str, set] = {}
    for p in needed:
        anchor = _first_closed_dir(p)
        if anchor is None:
            if not _other_can_read(p):
                return None
            continue
        keep = next((r for r in roots if _under(p, r)), p if os.path.isdir(p) else os.path.dirname(p))
        if not _under(keep, anchor) or keep == anchor or not _readable_below(keep, p):
            return None
        hide.setdefault(anchor, set()).add(keep)
    anchors = sorted(hide)
    if any(_under(a, b) for a in anchors for b in anchors if a != b):
        return None
    hide_list = []
    for a in anchors:
        keeps = sorted(hide[a], key=len)
        keeps = [k for i, k in enumerate(keeps) if not any(_under(k, o) for o in keeps[:i])]
        hide_list.append([a, keeps])
    protected = needed + [k for _, ks in hide_list for k in ks]
    scratch = [d for d in _scratch_dirs() if os.path.isdir(d) and not os.path.islink(d)
               and not any(_under(p, d) for p in protected) and not _under(d, workdir)]
    return {"hide": hide_list, "scratch": scratch, "scratch_mb": int(scratch_mb),
            "disk_mb": int(disk_mb), "workdir": workdir, "required": False}


def _id_ranges(kind: str) -> list[tuple[int, int]]:
    """[start, stop) ranges of ids usable in this user namespace (uid_map / gid_map)."""
    ranges = []
    try:
        with open(f"/proc/self/{kind}_map") as f:
            for line in f:
                inside, _, count = (int(x) for x in line.split())
                ranges.append((inside, inside + count))
    except (OSError, ValueError):
        pass
    return ranges


def _uid_pool() -> tuple[int, int] | None:
    """Where to draw dedicated uids from: our range if it is mapped (uid and gid),
    else the top of the largest mapped range (e.g. rootless containers map 0-65535)."""
    uids, gids = _id_ranges("uid"), _id_ranges("gid")
    def mapped(lo, hi, ranges):
        return any(a <= lo and hi <= b for a, b in ranges)
    if mapped(*_UID_RANGE, uids) and mapped(*_UID_RANGE, gids):
        return _UID_RANGE
    for a, b in sorted(uids, key=lambda r: r[1] - r[0], reverse=True):
        lo, hi = max(a, b - 10_000, 20_000), min(b, 65_000)  # stay below nobody (65534)
        if hi - lo >= 100 and mapped(lo, hi, gids):
            return lo, hi
    return None


def _proc_status(pid: int | str) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`.

    /proc/<pid> ownership is not used: after setuid a process is not dumpable and
    its /proc entries belong to root.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _proc_status(entry)
        uids = st.get("Uid", "").split()
        if uids and int(uids[0]) == uid and not st.get("State", "").startswith(("Z", "X")):
            pids.append(int(entry))
    return pids


def _pick_uid() -> int | None:
    """An unused uid for one sandbox run, or None when we cannot switch uid."""
    if os.geteuid() != 0:
        return None
    pool = _uid_pool()
    if pool is None:
        return None
    import pwd
    import random
    with _uid_lock:
        for _ in range(100):
            uid = random.randrange(*pool)
            if uid in _uids_in_use or _pids_of_uid(uid):
                continue
            try:
                pwd.getpwuid(uid)  # a real account: not ours to use
                continue
            except KeyError:
                pass
            _uids_in_use.add(uid)
            return uid
    return None


def _kill_uid(uid: int) -> None:
    """Kill every process running as `uid`, including ones that left the process group.

    Each pid is pinned with a pidfd before its owner is checked, so a recycled pid
    is never signalled; passes repeat until /proc shows none left (RLIMIT_NPROC
    bounds how many a fork bomb can make between passes).
    """
    for _ in range(50):
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except (OSError, AttributeError):
                fd = None
            try:
                if _proc_status(pid).get("Uid", "").split()[:1] != [str(uid)]:
                    continue
                if fd is not None:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            finally:
                if fd is not None:
                    os.close(fd)
        time.sleep(0.01)


def _remove_uid_files(uid: int) -> None:
    """Delete what the sandbox uid left in world-writable places."""
    for d in _scratch_dirs():
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for name in entries:
            p = os.path.join(d, name)
            try:
                if os.lstat(p).st_uid != uid:
                    continue
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.unlink(p)
            except OSError:
                pass


def _nproc_for_current_user(extra: int) -> int:
    """Non-root: RLIMIT_NPROC counts all of this user's threads, so add our usage."""
    threads = 0
    for pid in _pids_of_uid(os.getuid()):
        try:
            threads += int(_proc_status(pid).get("Threads", "1"))
        except ValueError:
            threads += 1
    return threads + extra


class _Capped:
    """Keeps the first `cap` bytes and a short tail; counts the rest; notes whether
    `watch` went by (anywhere: output printed after it, e.g. by atexit, is kept too)."""

    def __init__(self, cap: int, watch: bytes = b""):
        self.cap, self.head, self.tail, self.total = cap, bytearray(), b"", 0
        self.watch, self.seen = watch, False

    def add(self, data: bytes) -> None:
        if self.watch and not self.seen:
            self.seen = self.watch in self.tail[-len(self.watch):] + data
        self.total += len(data)
        room = self.cap - len(self.head)
        if room > 0:
            self.head += data[:room]
        self.tail = (self.tail + data)[-512:]

    def text(self) -> str:
        out = self.head.decode("utf-8", "replace")
        if self.total > self.cap:
            out += f"\n... [output truncated: {self.total} bytes in total]"
        return out


def _kill_group(pid: int) -> None:
    for _ in range(3):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return


# ---------------------------------------------------------------------- public API

def run_code(code: str, timeout_s: float = 10, memory_mb: int | None = 1024,
             cpu_s: int | None = None, max_output_bytes: int = 1 << 20, *,
             nproc: int = 64, file_size_mb: int = 64, max_open_files: int = 256,
             network: bool = False, disk_mb: int = 256) -> SandboxResult:
    """Run `code` as a Python program in a contained child process.

    Statuses: "passed" (ran to its end), "failed" (exception, sys.exit, non-zero
    exit), "timeout" (wall clock or CPU limit), "memory" (MemoryError under the
    address-space limit), "killed" (ended by a signal), "error" (the sandbox itself
    could not run the code). stdout/stderr keep the first `max_output_bytes` each.
    """
    start = time.monotonic()
    cpu = int(cpu_s) if cpu_s is not None else int(timeout_s) + 1
    limits = {"RLIMIT_CPU": max(cpu, 1), "RLIMIT_CORE": 0,
              "RLIMIT_FSIZE": file_size_mb << 20, "RLIMIT_NOFILE": max_open_files}
    if memory_mb:
        limits["RLIMIT_AS"] = int(memory_mb) << 20
    uid = _pick_uid()
    limits["RLIMIT_NPROC"] = nproc if uid is not None else _nproc_for_current_user(nproc)
    workdir = tempfile.mkdtemp(prefix="diffmas_sbx_")
    nonce = secrets.token_hex(16)
    cfg = {"limits": limits, "uid": uid, "gid": uid,
           "read_cap": uid is not None and _interpreter_needs_read_cap(),
           "mounts": _mount_plan(os.path.realpath(workdir), disk_mb) if uid is not None else None,
           "unshare_net": not network and os.geteuid() == 0,
           "setup_failed_rc": _SETUP_FAILED_RC}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}
    out = _Capped(max_output_bytes, watch=("\n" + nonce + "\n").encode())
    err = _Capped(max_output_bytes)
    proc = None
    timed_out = False
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=workdir, env=env, start_new_session=True, close_fds=True)
        try:
            proc.stdin.write((nonce + "\n" + code).encode("utf-8", "surrogatepass"))
        except (BrokenPipeError, OSError):
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
        timed_out = _pump(proc, out, err, start + timeout_s)
    except OSError as e:
        return SandboxResult("error", None, "", f"sandbox could not start: {e!r}",
                             time.monotonic() - start)
    finally:
        if proc is not None:
            _kill_group(proc.pid)
            if uid is not None:
                _kill_uid(uid)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            _drain(proc, out, err)
        if uid is not None:
            _remove_uid_files(uid)
            with _uid_lock:
                _uids_in_use.discard(uid)
        shutil.rmtree(workdir, ignore_errors=True)

    duration = time.monotonic() - start
    rc = proc.returncode
    stdout = out.text()
    marker = "\n" + nonce + "\n"
    finished = out.seen
    stdout = stdout.replace(marker, "")  # forked children may print it too
    stderr = err.text()
    last_err = err.tail.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    if timed_out or rc in (-signal.SIGXCPU,):
        status = "timeout"
    elif rc == _SETUP_FAILED_RC and "sandbox setup failed" in stderr:
        status = "error"
    elif rc == 0 and finished:  # ran to its end, whatever it wrote to stderr
        status = "passed"
    elif re.match(r"[\w.]*MemoryError\b", last_err[0]):  # also numpy's _ArrayMemoryError
        status = "memory"
    elif rc is not None and rc < 0:
        status = "killed"
    else:
        status = "failed"
    return SandboxResult(status, rc, stdout, stderr, duration)


def _pump(proc: subprocess.Popen, out: _Capped, err: _Capped, deadline: float) -> bool:
    """Read both pipes until they close or the deadline passes; True on timeout."""
    sel = selectors.DefaultSelector()  # epoll: no FD_SETSIZE limit, unlike select()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return proc.poll() is None
            if proc.poll() is not None:
                exited_at = exited_at or now
                if now - exited_at > 0.5:  # descendants still hold the pipes open
                    return False
            for key, _ in sel.select(timeout=min(0.1, deadline - now)):
                data = os.read(key.fd, 1 << 16)
                if data:
                    key.data.add(data)
                else:
                    sel.unregister(key.fileobj)
    finally:
        sel.close()
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return True
    return False


def _drain(proc: subprocess.Popen, out: _Capped, err: _Capped) -> None:
    """Collect what is left in the pipes once every writer is dead, then close them."""
    for pipe, cap in ((proc.stdout, out), (proc.stderr, err)):
        if pipe is None or pipe.closed:
            continue
        fd = pipe.fileno()
        os.set_blocking(fd, False)
        try:
            while True:
                data = os.read(fd, 1 << 16)
                if not data:
                    break
                cap.add(data)
        except (BlockingIOError, OSError):
            pass
        pipe.close()
