"""Two real processes (jax.distributed on localhost, CPU collectives) train together and match
a single-process run of the same global batches; their checkpoint restores in one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flax_linoss.train import checkpoint as ckpt_lib
from flax_linoss.train import default_config, trainer

WORKER = r"""
import json, sys
from flax_linoss.train import checkpoint as ckpt_lib
from flax_linoss.train import default_config, trainer

nproc, pid, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
config = default_config.get_tiny_config()
config.data.num_shards = 2  # the same global batches for 1 or 2 processes
config.train.num_steps = 8
config.train.eval_every = 8
config.train.checkpoint_every = 8
config.train.log_every = 8
config.train.async_checkpointing = False
if nproc > 1:
    config.parallel.distributed = True
    config.parallel.coordinator_address = f"localhost:{port}"
    config.parallel.num_processes = nproc
    config.parallel.process_id = pid
res = trainer.train_and_evaluate(config, workdir)
import jax
print("RESULT", json.dumps({"results": res, "devices": jax.device_count(),
                            "local": jax.local_device_count()}), flush=True)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(local_devices, cache):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    return env


def _result(stdout):
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _params(workdir):
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    # The checkpoint names other processes' devices: restore onto one local device.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    config = default_config.get_tiny_config()
    s = trainer.setup(config)
    target = ckpt_lib.abstract_like(trainer.create_train_state(s), one)
    out = mngr.restore(8, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    mngr.close()
    return jax.tree.map(np.asarray, out["state"])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cache = str(tmp_path / "cache")
    port = _free_port()
    two = str(tmp_path / "two")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "2", str(i), str(port), two],
            env=_env(2, cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outs.append(out)
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    r2 = [_result(o) for o in outs]
    assert [r["devices"] for r in r2] == [4, 4] and [r["local"] for r in r2] == [2, 2]
    timeless = [{k: v for k, v in r["results"].items() if k != "train_seconds"} for r in r2]
    assert timeless[0] == timeless[1]  # (each process times its own loop)

    # The same config in this single process (8 local devices).
    one = str(tmp_path / "one")
    config = default_config.get_tiny_config()
    config.data.num_shards = 2
    config.train.num_steps = 8
    config.train.eval_every = 8
    config.train.checkpoint_every = 4
    config.train.log_every = 4
    r1 = trainer.train_and_evaluate(config, one)
    assert r1["test_at_best_val"] == pytest.approx(r2[0]["results"]["test_at_best_val"])

    a, b = _params(two), _params(one)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)

    # The 2-process checkpoint restores in this single process (8 devices, another mesh).
    ev_two = trainer.evaluate(config, two, which="latest")
    ev_one = trainer.evaluate(config, one, which="latest")
    assert ev_two["step"] == 8
    assert ev_two["test_loss"] == pytest.approx(ev_one["test_loss"], rel=1e-4)
