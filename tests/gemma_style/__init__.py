"""A small decoder in the Gemma attention protocol, written here as a test fixture.

It follows the interfaces of flax's ``examples/gemma`` (nnx: ``modules``, ``transformer``,
``sampler``, ``transformer_cfg``) and of Google DeepMind's ``gemma`` library (linen:
``linen_modules``, ``linen_transformer``): the attention constructor and call
``attn(x, segment_pos, cache, attn_mask) -> (cache, out)``, ``init_cache(cache_size,
batch_size, dtype)``, a functional cache dict threaded through a ``lax.while_loop`` sampler,
``[B, L, L']`` boolean masks, ``ShardingConfig`` kernel/activation specs. The code is this
project's own and much smaller. ``testing`` holds the checks that swap tests reuse.
"""
