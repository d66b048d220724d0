"""The transformer LM with any registered mixer: linen == nnx, hybrids, decoding through the
caches, packing, a user-registered mixer, and training from the CLI on a token task."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags
from flax import nnx
from oscillator_reference import assert_rel_close

from flax_linoss import convert
from flax_linoss import models as fn
from flax_linoss.mixers import registry
from flax_linoss.models import linen as fl
from flax_linoss.models import mixer_pattern

OPTIONS = {"state_size": 8}


def _tokens(batch=2, length=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 1, 16)


def _nnx(mixer, **kw):
    return fn.TransformerLM(16, 3, 32, mixer=mixer, mixer_options=OPTIONS, rngs=nnx.Rngs(0), **kw)


def test_hybrid_pattern_repeats_block_by_block():
    assert mixer_pattern("linoss-im,linoss-im,attention", 5) == [
        "linoss-im",
        "linoss-im",
        "attention",
        "linoss-im",
        "linoss-im",
    ]
    model = _nnx("d-linoss,attention")
    kinds = [type(b.mixer).__name__ for b in model.blocks]
    assert kinds == ["DLinOSSMixer", "MultiHeadAttention", "DLinOSSMixer"]
    with pytest.raises(ValueError, match="Unknown mixer 'lstm'"):
        mixer_pattern("linoss-im,lstm", 2)


@pytest.mark.parametrize("mixer", ["attention", "linoss-imex", "linoss-im,attention"])
def test_linen_equals_nnx(mixer):
    tokens = _tokens()
    lin = fl.TransformerLM(16, 3, 32, mixer=mixer, mixer_options=OPTIONS)
    variables = lin.init(jax.random.key(1), tokens, deterministic=True)
    model = _nnx(mixer)
    before = model(tokens, deterministic=True)
    convert.linen_to_nnx(variables, model)
    want = lin.apply(variables, tokens, deterministic=True)
    assert not np.allclose(before, want)
    np.testing.assert_allclose(model(tokens, deterministic=True), want, atol=1e-5)


@pytest.mark.parametrize("mixer", ["attention", "d-linoss", "linoss-im,attention"])
def test_decoding_through_the_caches_equals_the_full_pass(mixer):
    """A 4-token prompt in one call (attention blocks take it token by token), then one
    token per call: every pattern decodes any number of new tokens per call."""
    tokens = _tokens(length=10)
    model = _nnx(mixer)
    full = nnx.jit(lambda m, x: m(x, deterministic=True))(model, tokens)
    model.init_cache(tokens.shape[0], tokens.shape[1])
    decode = nnx.jit(lambda m, x: m(x, decode=True, deterministic=True))
    steps = [decode(model, tokens[:, :4])]
    steps += [decode(model, tokens[:, t : t + 1]) for t in range(4, 10)]
    assert_rel_close(jnp.concatenate(steps, 1), full, 2e-5)


def test_a_bfloat16_hybrid_decodes_through_caches_of_its_dtype():
    # Flax's attention caches keys and values in the dtype init_cache is given: the
    # activations' (bfloat16), or writing a step into the cache fails.
    tokens = _tokens(length=6)
    model = _nnx("linoss-im,attention", dtype=jnp.bfloat16)
    full = model(tokens, deterministic=True)
    model.init_cache(tokens.shape[0], tokens.shape[1])
    assert model.blocks[1].mixer.cached_key.dtype == jnp.bfloat16
    steps = [model(tokens[:, t : t + 1], decode=True, deterministic=True) for t in range(6)]
    assert_rel_close(jnp.concatenate(steps, 1), full, 3e-2)


def test_packed_segments_equal_running_them_alone():
    model = _nnx("linoss-im,attention", positional="none")
    a, b = _tokens(1, 5, seed=1), _tokens(1, 7, seed=2)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 5 + [2] * 7])
    run = nnx.jit(lambda m, x, seg=None: m(x, segment_ids=seg, deterministic=True))
    out = run(model, packed, seg)
    assert_rel_close(out[:, :5], run(model, a), 1e-5)
    assert_rel_close(out[:, 5:], run(model, b), 1e-5)
    # Without the segments the second sequence sees the first (the test can fail).
    assert not np.allclose(run(model, packed)[:, 5:], run(model, b))


def test_a_registered_attention_gets_no_linoss_options():
    registry.register_mixer("test-attn", nnx.MultiHeadAttention, api="nnx")
    try:
        model = fn.TransformerLM(
            16,
            2,
            32,
            mixer="test-attn,linoss-im",
            mixer_options={"state_size": 8},
            rngs=nnx.Rngs(0),
        )
        assert model.blocks[1].mixer.state_size == 8
        assert model(_tokens(), deterministic=True).shape == (2, 12, 16)
    finally:
        registry._REGISTRY.pop(("nnx", "test-attn"))


def test_a_user_registered_mixer_is_used():
    class Identity(nnx.Module):
        def __init__(self, num_heads, in_features, *, decode=False, rngs, **kw):
            self.scale = nnx.Param(jnp.ones((in_features,)))

        def __call__(self, x, **kw):
            return x * self.scale[...]

    registry.register_mixer("test-identity", Identity, api="nnx")
    try:
        model = fn.TransformerLM(16, 2, 32, mixer="test-identity,attention", rngs=nnx.Rngs(0))
        assert type(model.blocks[0].mixer) is Identity
        assert model(_tokens(), deterministic=True).shape == (2, 12, 16)
    finally:
        registry._REGISTRY.pop(("nnx", "test-identity"))


TINY = """
import importlib.util, pathlib
spec = importlib.util.spec_from_file_location("m", pathlib.Path({repo!r}) / "configs" / "mixers.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)

def get_config():
    c = m.get_config("mqar")
    c.data.options.update(vocab_size=32, seq_len=16, num_kv_pairs=2, num_train=256,
                          num_val=64, num_test=64)
    c.model.update(hidden_size=16, state_size=8, num_blocks=2)
    c.train.update(num_steps=6, eval_every=6, checkpoint_every=6, log_every=3)
    c.optimizer.warmup_steps = 1
    c.data.eval_batch_size = 32
    return c
"""


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_cli_trains_a_mixer_on_mqar_and_reports_accuracy(tmp_path, framework):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = tmp_path / "tiny.py"
    cfg.write_text(TINY.format(repo=repo))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flax_linoss",
            "train",
            f"--config={cfg}",
            f"--workdir={tmp_path / 'run'}",
            "--config.model.mixer=d-linoss,attention",
            f"--config.framework={framework}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "transformer (d-linoss,attention) on synthetic/mqar" in out.stdout
    assert "(jit over 1 device, 1 process)" in out.stdout
    assert "Final: test accuracy" in out.stdout
    assert re.search(r"eval step 6: .* \| val decode_accuracy [\d.]+ \| test decode_", out.stdout)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"decode_accuracy"' in metrics


def test_the_train_step_passes_packing_to_the_model():
    from flax_linoss.train import default_config, trainer
    from flax_linoss.train.model import make_model

    config = default_config.get_tiny_config()
    config.model.kind = "transformer"
    config.model.update(hidden_size=16, state_size=8, num_blocks=1, mixer="linoss-im,attention")
    shape = {"task": "lm", "vocab_size": 16, "length": 12}
    fns = make_model(config, shape)
    variables = fns.init(jax.random.key(0), _tokens())
    tokens = _tokens()
    batch = {
        "series": tokens,
        "label": jnp.roll(tokens, -1, 1),
        "weight": jnp.ones(tokens.shape),
        "valid": jnp.ones((2,), bool),
    }
    packed = {**batch, "segment_ids": jnp.array([[1] * 5 + [2] * 7] * 2)}
    step = jax.jit(trainer.make_step_fn(fns, trainer.make_optimizer(config)), static_argnums=2)
    state = trainer.TrainState(
        step=jnp.zeros((), jnp.int32),
        **variables,
        opt_state=trainer.make_optimizer(config).init(variables["params"]),
        rng=jax.random.key(1),
    )
    plain_loss = step(state, batch, None)[1]["loss"]
    packed_loss = step(state, packed, None)[1]["loss"]
    assert not np.isclose(plain_loss, packed_loss)


@pytest.mark.slow
def test_bench_mixers_runs_small(tmp_path):
    """benchmarks/bench_mixers.py end to end at a tiny size: a training row and the
    generation-cost table (a LinOSS state does not grow with the context; attention's
    key/value cache does)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mixers.py"
    spec = importlib.util.spec_from_file_location("bench_mixers", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "m.md"
    # A rerun keeps the hand-written reading of the tables (and nothing else of the file).
    out.write_text(f"# old\n\nstale\n\n{bench.ANALYSIS}\n\n- reading\n\n## old table\n\n| x |\n")
    # The papers' plain block (the cheapest to compile) as the LinOSS row: it also gives the
    # cost table its "x plain" column.
    args = ["--tasks", "induction", "--mixers", "linoss-im:plain", "attention"]
    args += ["--lengths", "16", "--steps", "4", "--seeds", "0", "--cost-length", "32"]
    args += ["--decode-contexts", "16", "64", "--workdir", str(tmp_path / "w")]
    result = bench.main([*args, "--out", str(out)])
    text = out.read_text()
    assert f"{bench.ANALYSIS}\n\n- reading\n\n## induction, length 16" in text
    assert "stale" not in text and "old table" not in text
    assert "## induction, length 16" in text and "Generation cost" in text
    assert "## Train-step cost at length 32" in text
    runs = [json.loads(x) for x in open(tmp_path / "w" / "mixers.jsonl")]
    plain = "linoss-im:plain"
    assert sorted(r["mixer"] for r in runs) == ["attention", plain]
    # The deciding rows run every seed at the first length, the others the first seed.
    assert bench.row_seeds(plain, True, [0, 1]) == [0, 1]
    assert bench.row_seeds(plain, False, [0, 1]) == [0]
    assert bench.row_seeds("attention", True, [0, 1]) == [0]
    assert f"| {plain} | " in text and "| 1.00 |" in text  # its cost relative to itself
    cache = {(r["mixer"], r["context"]): r["cache_mib"] for r in result["decode"]}
    assert cache[(plain, 16)] == cache[(plain, 64)]
    assert cache[("attention", 64)] > 1.5 * cache[("attention", 16)]  # (64 + 32) / (16 + 32)


@pytest.mark.parametrize(
    ("block", "kind", "selective"),
    [
        ("outer", "outer", False),
        ("plain", "plain", False),
        ("selective", "plain", True),
        ("outer_selective", "outer", True),
        ("outer", "outer", "linoss-im-selective"),  # the registered selective mixer
    ],
)
def test_mixer_block_config_builds_that_block(block, kind, selective):
    """``model.mixer_block`` picks the LinOSS mixers' block and selectivity (the
    parameters show it: the outer block's ``heads``, a selective gate's ``dt_*``)."""
    from flax_linoss.train import default_config
    from flax_linoss.train.model import make_model

    config = default_config.get_tiny_config()
    config.model.kind = "transformer"
    mixer = selective if isinstance(selective, str) else "linoss-im"
    config.model.update(hidden_size=16, state_size=8, num_blocks=1, mixer=mixer)
    config.model.mixer_block = block
    fns = make_model(config, {"task": "lm", "vocab_size": 16, "length": 12})
    names = {
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(
            fns.init(jax.random.key(0), _tokens())["params"]
        )[0]
    }
    assert any("heads/a_raw" in n for n in names) == (kind == "outer")
    assert any("dt_proj" in n or "dt_kernel" in n for n in names) == bool(selective)
