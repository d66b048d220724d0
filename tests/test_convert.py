"""flax_linoss.convert: linen <-> nnx weights give identical models."""

import jax
import numpy as np
import pytest
from flax import nnx

from flax_linoss import convert
from flax_linoss import linen as fl
from flax_linoss import nnx as fn


@pytest.mark.parametrize(
    ("disc", "norm"), [("im", "batch"), ("imex", "layer"), ("damped", "rms"), ("damped", "batch")]
)
def test_linen_to_nnx_outputs_agree_and_round_trip(disc, norm):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 30, 7))
    linen_model = fl.LinOSSModel(2, 16, 8, 3, discretization=disc, norm=norm)
    variables = jax.jit(lambda k: linen_model.init(k, x, deterministic=True))(jax.random.PRNGKey(1))
    # Make the batch statistics non-trivial so that their conversion is tested too.
    if norm == "batch":
        _, upd = linen_model.apply(
            variables,
            x,
            deterministic=False,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(2)},
        )
        variables = {**variables, **upd}
    nnx_model = fn.LinOSSModel(7, 2, 16, 8, 3, discretization=disc, norm=norm, rngs=nnx.Rngs(5))
    before = nnx_model(x, deterministic=True)
    convert.linen_to_nnx(variables, nnx_model)
    want = linen_model.apply(variables, x, deterministic=True)
    assert not np.allclose(before, want)  # different init: the copy is what made them agree
    np.testing.assert_allclose(nnx_model(x, deterministic=True), want, atol=1e-6)
    back = convert.nnx_to_linen(nnx_model)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


def test_nnx_to_linen_runs_in_linen():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 3))
    nnx_model = fn.LinOSSModel(3, 1, 8, 4, 2, task="regression", rngs=nnx.Rngs(0))
    variables = convert.nnx_to_linen(nnx_model)
    out = fl.LinOSSModel(1, 8, 4, 2, task="regression").apply(variables, x, deterministic=True)
    np.testing.assert_allclose(out, nnx_model(x, deterministic=True), atol=1e-6)


def test_mismatched_models_are_refused_clearly():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 3))
    variables = fl.LinOSSModel(1, 8, 4, 2).init(jax.random.PRNGKey(0), x, deterministic=True)
    with pytest.raises(ValueError, match="missing"):
        convert.linen_to_nnx(variables, fn.LinOSSModel(3, 2, 8, 4, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="shape"):
        convert.linen_to_nnx(variables, fn.LinOSSModel(3, 1, 8, 6, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="Unknown linen collections"):
        convert.linen_to_nnx(
            {**variables, "cache": {}}, fn.LinOSSModel(3, 1, 8, 4, 2, rngs=nnx.Rngs(0))
        )
