"""Multi-host helpers: when to initialise, which rows each host loads, and a real
two-process run on CPU (2 processes x 2 simulated devices, gloo collectives)."""
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import xla_env

from diffmas_jax import distributed
from diffmas_jax.cli import UserError

REPO = Path(__file__).resolve().parents[1]


def test_when_to_initialize():
    assert not distributed.should_initialize({})
    assert not distributed.should_initialize({"TPU_WORKER_HOSTNAMES": "localhost"})  # one-host TPU VM
    assert distributed.should_initialize({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3"})
    assert distributed.should_initialize({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "2",
                                          "JAX_PROCESS_ID": "1"})
    assert not distributed.should_initialize({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "1"})
    assert distributed.should_initialize({"SLURM_NTASKS": "4"})
    assert distributed.should_initialize({"DIFFMAS_DISTRIBUTED": "1"})
    assert not distributed.should_initialize({"DIFFMAS_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "a,b"})
    assert distributed.initialize_kwargs({}) == {}
    assert distributed.initialize_kwargs({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4",
                                          "JAX_PROCESS_ID": "2"}) == \
        {"coordinator_address": "h:1", "num_processes": 4, "process_id": 2}
    with pytest.raises(UserError, match="JAX_PROCESS_ID is not"):
        distributed.initialize_kwargs({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4"})
    # single host: a no-op, and this process is the main one writing the workdir
    assert distributed.maybe_initialize({}) is False
    assert distributed.is_main_process() and distributed.process_count() == 1
    assert distributed.output_dir("/some/workdir") == Path("/some/workdir")


def test_each_host_gets_its_share_of_the_rows():
    idx = np.arange(100, 108)
    parts = [distributed.local_indices(idx, p, 4).tolist() for p in range(4)]
    assert parts == [[100, 101], [102, 103], [104, 105], [106, 107]]
    assert distributed.local_indices(idx).tolist() == idx.tolist()  # one host: everything
    with pytest.raises(UserError, match="does not split over 3 hosts"):
        distributed.local_indices(idx, 0, 3)
    items = list("abcdefg")
    shards = [distributed.host_shard(items, p, 3) for p in range(3)]
    assert sorted(sum(shards, [])) == items and shards[0] == ["a", "d", "g"]


WORKER = textwrap.dedent('''
    import json, sys
    from diffmas_jax import distributed as d
    assert d.maybe_initialize()
    import jax, numpy as np
    from diffmas_jax.sharding import make_mesh
    mesh = make_mesh((1, -1, 1))  # 4 devices over both processes
    rows = d.local_indices(np.arange(8) + 100)
    batch = d.global_batch({"x": rows[:, None] * np.ones((1, 3), np.int32)}, mesh)
    total = int(jax.jit(lambda b: b["x"].sum())(batch))
    gathered = d.to_host(batch["x"] * 2)  # rows on the other host's devices too
    out = dict(index=d.process_index(), count=d.process_count(), main=d.is_main_process(), rows=rows.tolist(),
               global_shape=list(batch["x"].shape), local_devices=len(jax.local_devices()),
               devices=jax.device_count(), total=total, gathered=gathered[:, 0].tolist(),
               shared=d.broadcast_from_main({"done": ["a", "b"] if d.is_main_process() else []}),
               writes_workdir=str(d.output_dir("/w")) == "/w")
    d.sync("done")
    print("RESULT" + json.dumps(out), flush=True)
''')


def run_two_processes(code: str, *args: str, timeout: int = 120) -> list:
    """Run ``code`` as processes 0 and 1 of a 2-host CPU job (2 devices each); their RESULT dicts."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = xla_env("--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                      JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=str(REPO),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.split("RESULT", 1)[1]))
    return outs


def test_two_processes_build_one_global_batch_and_agree():
    a, b = run_two_processes(WORKER)
    assert (a["index"], b["index"]) == (0, 1) and a["count"] == b["count"] == 2
    assert a["main"] and not b["main"] and a["writes_workdir"] and not b["writes_workdir"]
    assert a["rows"] == [100, 101, 102, 103] and b["rows"] == [104, 105, 106, 107]
    assert a["global_shape"] == b["global_shape"] == [8, 3] and a["devices"] == 4 and a["local_devices"] == 2
    assert a["total"] == b["total"] == 3 * sum(range(100, 108))  # one global array from both hosts' rows
    assert a["gathered"] == b["gathered"] == [2 * r for r in range(100, 108)]  # to_host: every row, every host
    assert a["shared"] == b["shared"] == {"done": ["a", "b"]}   # process 0's view, on every host


CKPT_WORKER = textwrap.dedent('''
    import json, sys
    from diffmas_jax import distributed as d
    assert d.maybe_initialize()
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from diffmas_jax.checkpoint import Checkpointer, abstract_like
    from diffmas_jax.sharding import make_mesh
    ckdir = sys.argv[1]
    full = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    # saved: rows over all 4 devices of both hosts, plus a replicated leaf
    mesh = make_mesh((1, 4, 1))
    rows = NamedSharding(mesh, P("fsdp"))
    state = {"w": jax.make_array_from_callback(full.shape, rows, lambda i: full[i]),
             "b": jax.device_put(np.ones(3, np.float32), NamedSharding(mesh, P()))}
    ck = Checkpointer(ckdir)
    ck.save(5, state, {"step": 5})
    # restored onto another layout: columns over (data=2) x (tensor=2)
    mesh2 = make_mesh((2, 1, 2))
    target = {"w": NamedSharding(mesh2, P("data", "tensor")), "b": NamedSharding(mesh2, P())}
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, target)
    step, got, meta = Checkpointer(ckdir).restore_latest(abstract)
    out = dict(step=step, meta=meta, w_equal=bool((d.to_host(got["w"]) == full).all()),
               b=d.to_host(got["b"]).tolist(), spec=str(got["w"].sharding.spec),
               local_shards=len(got["w"].addressable_shards))
    d.sync("ckpt-done")
    print("RESULT" + json.dumps(out), flush=True)
''')


def test_two_processes_save_and_restore_one_checkpoint_on_another_mesh(tmp_path):
    """Orbax across hosts: both processes write their shards of one checkpoint into a
    directory they share, and restore it onto a different mesh layout."""
    outs = run_two_processes(CKPT_WORKER, str(tmp_path / "ck"), timeout=180)
    for o in outs:
        assert o["step"] == 5 and o["meta"]["step"] == 5, o
        assert o["w_equal"] and o["b"] == [1.0, 1.0, 1.0], o
        assert o["spec"] == "P('data', 'tensor')" and o["local_shards"] == 2, o
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["5"]


@pytest.mark.parametrize("env, match", [
    # the coordinator is set but the process count forgotten: an error, not every host training alone
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_PROCESS_ID": "1"}, "JAX_NUM_PROCESSES is not"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "1"},
     "JAX_NUM_PROCESSES must be an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2"),
    ({"DIFFMAS_DISTRIBUTED": "1", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "0", "JAX_LOCAL_DEVICE_IDS": "0,x"}, "JAX_LOCAL_DEVICE_IDS must be"),
])
def test_incomplete_or_malformed_launcher_variables_are_one_line_errors(env, match):
    assert distributed.should_initialize(env)
    with pytest.raises(UserError, match=match):
        distributed.maybe_initialize(env)


SPLIT_WORKER = textwrap.dedent('''
    import json, sys
    from diffmas_jax import distributed as d
    from diffmas_jax.cli import UserError
    assert d.maybe_initialize()
    import numpy as np
    from diffmas_jax.sharding import make_mesh
    out = {}
    for shape, rows in [((1, 1, -1), 8), ((1, 4, 1), 6), ((1, 2, 2), 8)]:
        mesh = make_mesh(shape)
        local = d.local_indices(np.arange(rows))
        try:
            b = d.global_batch({"x": local[:, None] * np.ones((1, 3), np.int32)}, mesh)
            out[str(rows) + str(shape)] = dict(shape=list(b["x"].shape), rows=d.to_host(b["x"])[:, 0].tolist())
        except UserError as e:
            out[str(rows) + str(shape)] = str(e)
        try:
            d.check_batch_layout(rows, mesh)
            out["check" + str(rows) + str(shape)] = "ok"
        except UserError as e:
            out["check" + str(rows) + str(shape)] = str(e)
    d.sync("split-done")
    print("RESULT" + json.dumps(out), flush=True)
''')


def test_two_processes_refuse_a_batch_the_mesh_does_not_split_over_the_hosts():
    """A replicated batch fed different rows by each host would train each host on its own
    rows (silently diverging): no batch axis > 1, or rows the batch axes do not divide, is an error."""
    for o in run_two_processes(SPLIT_WORKER):
        for key in ("8(1, 1, -1)", "6(1, 4, 1)", "check8(1, 1, -1)", "check6(1, 4, 1)"):
            assert isinstance(o[key], str) and "hosts" in o[key] and o[key] != "ok", (key, o[key])
        assert o["8(1, 2, 2)"] == {"shape": [8, 3], "rows": list(range(8))} and o["check8(1, 2, 2)"] == "ok", o


class _Dev:
    def __init__(self, process_index):
        self.process_index = process_index


def _mesh(shape, hosts):
    """A stand-in mesh of ``shape`` whose devices belong to ``hosts`` processes in order."""
    n = int(np.prod(shape))
    devices = np.array([_Dev(i * hosts // n) for i in range(n)], dtype=object).reshape(shape)
    return type("M", (), {"shape": dict(zip(("data", "fsdp", "tensor"), shape)), "devices": devices})()


def test_batch_split_over_hosts_is_checked_from_the_mesh_alone():
    assert distributed.batch_split_error(16, _mesh((1, 4, 4), 4), count=4) is None    # v5e-16, batch 16
    assert distributed.batch_split_error(8, _mesh((2, 2, 4), 4), count=4) is None
    assert "batch_size=1" in distributed.batch_split_error(1, _mesh((1, 4, 4), 4), count=4)  # the paper's batch 1
    assert "divisible by 4" in distributed.batch_split_error(6, _mesh((1, 4, 4), 4), count=4)
    assert "no batch axis" in distributed.batch_split_error(8, _mesh((1, 1, 16), 4), count=4)
    assert "= 2) do not split rows over 4 hosts" in distributed.batch_split_error(8, _mesh((1, 2, 8), 4), count=4)
    assert "device mesh" in distributed.batch_split_error(8, None, count=2)
    assert distributed.batch_split_error(1, None, count=1) is None   # one host: anything goes
    # the hosts' devices interleaved along the batch axis: host p would not hold rows p*B/P..
    bad = _mesh((1, 4, 1), 2)
    bad.devices = bad.devices[:, [0, 2, 1, 3], :]
    assert "contiguous" in distributed.batch_split_error(8, bad, count=2)
