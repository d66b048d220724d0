"""flax_linoss.mixers.masks: flax attention masks -> step validity and packed segments."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from flax_linoss.mixers.masks import combine_segment_ids, reduce_mask


def _starts(seg):
    seg = np.asarray(seg)
    return np.concatenate([np.zeros_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]], -1)


def test_lm1b_style_masks():
    """Padding + causal + packing, exactly as lm1b's TransformerLM builds its mask."""
    tokens = jnp.array([[5, 6, 7, 8, 9, 4, 3, 0, 0], [0, 0, 1, 2, 3, 4, 5, 6, 7]])
    segs = jnp.array([[1, 1, 1, 2, 2, 3, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1]])
    mask = nn.combine_masks(
        nn.make_attention_mask(tokens > 0, tokens > 0),
        nn.make_causal_mask(tokens),
        nn.make_attention_mask(segs, segs, jnp.equal),
    )
    valid, seg = reduce_mask(mask, tokens.shape)
    np.testing.assert_array_equal(valid, tokens > 0)
    want = np.zeros_like(np.asarray(tokens), bool)
    want[0, [3, 5]] = True
    np.testing.assert_array_equal(_starts(seg), want)


def test_padding_between_segments_and_noncausal_masks():
    """A segment starting right after padding is still detected; a full mask is one segment."""
    segs = jnp.array([[1, 1, 0, 2, 2, 0, 0, 3]])
    valid_in = segs > 0
    block = nn.combine_masks(
        nn.make_attention_mask(valid_in, valid_in), nn.make_attention_mask(segs, segs, jnp.equal)
    )
    valid, seg = reduce_mask(block, segs.shape)
    np.testing.assert_array_equal(valid, valid_in)
    np.testing.assert_array_equal(_starts(seg)[0], [0, 0, 0, 1, 0, 0, 0, 1])
    valid, seg = reduce_mask(nn.make_attention_mask(valid_in, valid_in), segs.shape)
    assert not _starts(seg).any()


def test_per_step_mask_and_broadcasting():
    valid, seg = reduce_mask(jnp.array([1.0, 0.0, 1.0]), (2, 3))
    assert seg is None and valid.dtype == jnp.bool_ and valid.shape == (2, 3)
    causal = nn.make_causal_mask(jnp.ones((1, 4)))  # [1, 1, 4, 4], batch broadcast
    valid, seg = reduce_mask(causal, (3, 4))
    assert valid.shape == (3, 4) and bool(valid.all()) and not _starts(seg).any()
    heads = jnp.ones((2, 4, 5, 5), bool)
    assert reduce_mask(heads, (2, 5))[0].shape == (2, 5)
    assert reduce_mask(None, (2, 5)) == (None, None)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((4,), "cannot broadcast"),
        ((2, 1, 4, 5), "query/key lengths"),
        ((2, 1, 1, 5, 5), "rank 5"),
        ((2, 5, 7), "query/key lengths"),
    ],
)
def test_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        reduce_mask(jnp.ones(shape), (2, 5))


def test_combine_segment_ids():
    a = jnp.array([[0, 0, 1, 1, 1]])
    b = jnp.array([[7, 7, 7, 8, 8]])
    np.testing.assert_array_equal(_starts(combine_segment_ids(a, b))[0], [0, 0, 1, 1, 0])
    assert combine_segment_ids(None, None) is None
    assert combine_segment_ids(a, None) is a
