"""Two real processes (jax.distributed on localhost, CPU collectives) train one model sharded
across both (fsdp spans the processes), stop, resume, and match a single-process run of the
same global batches; their checkpoint restores in one process on another mesh."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import xla_flags

from flax_linoss.train import checkpoint as ckpt_lib
from flax_linoss.train import default_config, trainer

# The run: fsdp=4 x model=2 over 8 devices; with 2 processes x 4 devices the fsdp axis
# (outer to model) spans both processes.
CONFIG = """
config.data.num_shards = 2  # the same global batches for 1 or 2 processes
config.model.dropout_rate = 0.0
config.parallel.fsdp_axis_size = 4
config.parallel.model_axis_size = 2
config.train.num_steps = 8
config.train.eval_every = 8
config.train.checkpoint_every = 4
config.train.log_every = 4
config.train.async_checkpointing = False
"""

WORKER = (
    r"""
import json, sys
from flax_linoss.train import data as data_lib
from flax_linoss.train import default_config, trainer

nproc, pid, port, workdir, stop = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                   sys.argv[4], int(sys.argv[5]))
real = data_lib.train_iterator


def train_iterator(config, source):  # stop (as if killed) before batch `stop + 1`
    it = real(config, source)

    class Stopping:
        n = 0

        def __next__(self):
            self.n += 1
            if stop and self.n > stop:
                raise KeyboardInterrupt("stop")
            return next(it)

        def __getattr__(self, name):
            return getattr(it, name)

    return Stopping()


data_lib.train_iterator = train_iterator
config = default_config.get_tiny_config()
"""
    + CONFIG
    + r"""
if nproc > 1:
    config.parallel.distributed = True
    config.parallel.coordinator_address = f"localhost:{port}"
    config.parallel.num_processes = nproc
    config.parallel.process_id = pid
try:
    res = trainer.train_and_evaluate(config, workdir)
except KeyboardInterrupt:
    print("STOPPED", flush=True)
    sys.exit(0)
import jax
print("RESULT", json.dumps({"results": res, "devices": jax.device_count(),
                            "local": jax.local_device_count()}), flush=True)
"""
)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(local_devices, cache):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = xla_flags(local_devices)
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    return env


def _result(stdout):
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _config():
    config = default_config.get_tiny_config()
    exec(CONFIG, {"config": config})
    return config


def _params(workdir):
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    # The checkpoint names other processes' devices: restore onto one local device.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = ckpt_lib.abstract_like(trainer.setup(_config()).abstract_state, one)
    out = mngr.restore(8, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    mngr.close()
    return jax.tree.map(np.asarray, out["state"])


def _two_processes(script, workdir, cache, stop):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "2", str(i), str(port), workdir, str(stop)],
            env=_env(4, cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            outs.append(out)
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.mark.slow
def test_two_processes_shard_fsdp_across_them_resume_and_match_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cache = str(tmp_path / "cache")
    two = str(tmp_path / "two")
    # Stopped after step 4 (its checkpoint written by both processes), then resumed.
    outs = _two_processes(script, two, cache, stop=4)
    assert all("STOPPED" in o and "checkpoint: saving step 4" in o for o in outs[:1]), outs[0]
    outs = _two_processes(script, two, cache, stop=0)
    assert "Resumed from" in outs[0] and "mesh: data=1 fsdp=4 seq=1 model=2" in outs[0]
    r2 = [_result(o) for o in outs]
    assert [r["devices"] for r in r2] == [8, 8] and [r["local"] for r in r2] == [4, 4]
    timeless = [{k: v for k, v in r["results"].items() if k != "train_seconds"} for r in r2]
    assert timeless[0] == timeless[1]  # (each process times its own loop)

    # The same config uninterrupted in this single process (8 local devices, same mesh).
    one = str(tmp_path / "one")
    r1 = trainer.train_and_evaluate(_config(), one)
    assert r1["test_at_best_val"] == pytest.approx(r2[0]["results"]["test_at_best_val"])

    a, b = _params(two), _params(one)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)

    # The 2-process checkpoint restores in this single process on another mesh.
    config = default_config.get_tiny_config()
    ev_two = trainer.evaluate(config, two, which="latest")
    ev_one = trainer.evaluate(config, one, which="latest")
    assert ev_two["step"] == 8
    assert ev_two["test_loss"] == pytest.approx(ev_one["test_loss"], rel=1e-4)
