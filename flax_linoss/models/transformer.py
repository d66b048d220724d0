"""A small decoder-only language model whose sequence mixer is any registered mixer.

In the style of flax's lm1b example: token embedding, optional positional encoding, ``N``
pre-norm blocks (mixer + MLP, each with a residual), a final norm and a tied or untied output
layer. The mixer of each block comes from the mixer registry
(:func:`flax_linoss.mixers.registry.get_mixer`, ``api="nnx"``): ``"attention"``,
``"linoss-im"``, ``"linoss-imex"``, ``"d-linoss"`` or one you registered. A comma-separated
pattern such as ``"linoss-im,linoss-im,attention"`` makes a hybrid (Griffin, Jamba): block
``i`` uses entry ``i mod len(pattern)``.

Written once in nnx; :mod:`flax_linoss.models.linen` derives ``TransformerLM`` from it.

Shapes: tokens ``[batch, length]`` int (0 is padding), logits ``[batch, length, vocab]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_linoss.common import check_size
from flax_linoss.mixers.registry import NNX, available_mixers, get_mixer

__all__ = ["POSITIONAL", "TransformerBlock", "TransformerLM", "mixer_pattern"]

#: Positional encodings: none (recurrent mixers know the order), learned, or sinusoidal.
POSITIONAL = ("none", "learned", "sinusoidal")

Dtype = Any


def mixer_pattern(mixer: str, num_layers: int) -> list[str]:
    """The mixer name of each block for ``mixer`` (a name or a comma-separated pattern).

    Raises:
      ValueError: an empty entry or a name no mixer is registered under (for nnx).
    """
    names = [m.strip() for m in str(mixer).split(",")]
    known = available_mixers(NNX)
    for name in names:
        if name not in known:
            raise ValueError(
                f"Unknown mixer {name!r} in {mixer!r}; registered for nnx: {known} "
                "(register yours with flax_linoss.register_mixer(name, cls, api='nnx'))."
            )
    return [names[i % len(names)] for i in range(num_layers)]


def _accepted(factory, options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that ``factory`` takes (all of them if it takes ``**kwargs``): the
    LinOSS options mean nothing to attention or to a mixer you registered."""
    try:
        target = factory.__init__ if isinstance(factory, type) else factory
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature: pass nothing extra
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


def _explicit_rows(tokens: jax.Array):
    """``out_sharding`` for a lookup of ``tokens`` under a mesh with explicit axes (the rows
    keep the tokens' sharding, the features are whole), else ``None``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    spec = tuple(jax.typeof(tokens).sharding.spec)
    spec = spec + (None,) * (tokens.ndim - len(spec))
    return jax.sharding.PartitionSpec(*spec, None)


def _sinusoid(length: int, width: int) -> np.ndarray:
    pos = np.arange(length)[:, None]
    div = np.exp(np.arange(0, width, 2) * -(np.log(10000.0) / width))
    table = np.zeros((length, width), np.float32)
    table[:, 0::2] = np.sin(pos * div)
    table[:, 1::2] = np.cos(pos * div)[:, : width // 2]
    return table


class TransformerBlock(nnx.Module):
    """Pre-norm block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))`` (dropout on both).

    Args:
      width: model width ``E``.
      mlp_dim: hidden width of the MLP.
      mixer: a registered mixer name (nnx).
      num_heads: passed to the mixer (attention heads; ignored by LinOSS mixers).
      dropout_rate: dropout on the mixer and MLP outputs.
      mixer_options: extra keyword arguments for the mixer (e.g. ``{"state_size": 64}``);
        those the mixer's constructor does not take are left out for it.
      dtype, param_dtype: as in Flax.
      rngs: ``nnx.Rngs``.
    """

    def __init__(
        self,
        width: int,
        mlp_dim: int,
        mixer: str,
        *,
        num_heads: int = 1,
        dropout_rate: float = 0.0,
        mixer_options: Mapping[str, Any] | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        factory = get_mixer(mixer, NNX)
        options = _accepted(factory, dict(mixer_options or {}))
        self.mixer_name = mixer
        self.norm_mixer = nnx.LayerNorm(width, **kw)
        self.mixer = factory(num_heads, width, decode=False, **options, **kw)
        # Mixers with a functional state (the LinOSS ones) take any number of new steps per
        # decoding call; others (Flax's attention) one.
        self.steps_per_call_any = hasattr(self.mixer, "init_state")
        self.norm_mlp = nnx.LayerNorm(width, **kw)
        self.mlp_in = nnx.Linear(width, mlp_dim, **kw)
        self.mlp_out = nnx.Linear(mlp_dim, width, **kw)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x, *, mask, deterministic: bool, decode: bool):
        h = self.norm_mixer(x)
        if decode and x.shape[-2] > 1 and not self.steps_per_call_any:
            # Flax's attention decodes one token per call: feed a prompt token by token.
            h = jnp.concatenate(
                [
                    self.mixer(h[..., i : i + 1, :], deterministic=True, decode=True)
                    for i in range(x.shape[-2])
                ],
                axis=-2,
            )
        else:
            h = self.mixer(h, mask=mask, deterministic=True, decode=decode)
        x = x + self.dropout(h, deterministic=deterministic)
        h = self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm_mlp(x))))
        return x + self.dropout(h, deterministic=deterministic)


class TransformerLM(nnx.Module):
    """A decoder-only language model with a registered sequence mixer in every block.

    Args:
      vocab_size: token ids ``0 .. vocab_size - 1`` (0 is padding).
      num_layers: blocks.
      width: model width ``E``.
      mlp_dim: MLP hidden width (default ``4 * width``).
      mixer: a registered mixer name or a comma-separated repeating pattern (hybrids).
      num_heads: attention heads (ignored by LinOSS mixers).
      positional: ``"none"``, ``"learned"`` or ``"sinusoidal"``.
      max_len: longest sequence (learned / sinusoidal positions and decoding caches).
      tie_embeddings: the output layer is the transposed embedding.
      dropout_rate: dropout on the embeddings and block outputs.
      mixer_options: extra keyword arguments for the LinOSS mixers (``state_size``,
        ``scan``, ...).
      deterministic: default mode (no dropout).
      dtype, param_dtype: as in Flax.
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` for training).
    """

    def __init__(
        self,
        vocab_size: int,
        num_layers: int = 2,
        width: int = 64,
        mlp_dim: int | None = None,
        *,
        mixer: str = "attention",
        num_heads: int = 4,
        positional: str = "learned",
        max_len: int = 2048,
        tie_embeddings: bool = True,
        dropout_rate: float = 0.0,
        mixer_options: Mapping[str, Any] | None = None,
        deterministic: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        for name, value in (("vocab_size", vocab_size), ("num_layers", num_layers)):
            check_size("TransformerLM", name, value)
        check_size("TransformerLM", "width", width)
        check_size("TransformerLM", "max_len", max_len)
        if positional not in POSITIONAL:
            raise ValueError(f"Unknown positional {positional!r}; expected one of {POSITIONAL}.")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.positional = positional
        self.tie_embeddings = tie_embeddings
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = nnx.Embed(vocab_size, width, **kw)
        self.pos_embed = nnx.Embed(max_len, width, **kw) if positional == "learned" else None
        self.blocks = nnx.List(
            [
                TransformerBlock(
                    width,
                    mlp_dim or 4 * width,
                    name,
                    num_heads=num_heads,
                    dropout_rate=dropout_rate,
                    mixer_options=mixer_options,
                    **kw,
                )
                for name in mixer_pattern(mixer, num_layers)
            ]
        )
        self.norm = nnx.LayerNorm(width, **kw)
        self.head = None if tie_embeddings else nnx.Linear(width, vocab_size, **kw)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.position: nnx.Cache | None = nnx.data(None)

    def init_cache(self, batch_size: int, max_length: int | None = None) -> None:
        """Creates every block's decoding cache for ``batch_size`` sequences."""
        length = max_length or self.max_len
        shape = (batch_size, length, self.embed.features)
        # The activations' dtype: what the decoding caches of Flax's attention hold.
        dtype = jnp.dtype(self.embed.dtype or self.embed.param_dtype)
        for block in self.blocks:
            block.mixer.init_cache(shape, dtype=dtype)
        self.position = nnx.Cache(jnp.zeros((), jnp.int32))

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool | None = None,
        decode: bool = False,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: ``[batch, length]`` int; 0 is padding.
          segment_ids: optional ``[batch, length]`` ints of packed sequences (each attends
            to / carries state within its own segment only).
          positions: optional ``[batch, length]`` positions within each packed sequence.
          deterministic: no dropout (default: the attribute).
          decode: continue from the caches made by :meth:`init_cache` (``length >= 1`` new
            tokens per call, for every pattern: LinOSS mixers take them in one call, and
            blocks whose mixer decodes one token per call, as Flax's attention, are fed the
            new tokens one at a time; no mask is needed: the caches hold the past).

        Returns:
          ``[batch, length, vocab_size]`` logits, float32 (float64 with float64 parameters).
        """
        deterministic = self.deterministic if deterministic is None else deterministic
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"TransformerLM expects int tokens [batch, length], got {tokens.dtype} "
                f"{tokens.shape}."
            )
        length = tokens.shape[1]
        rows = _explicit_rows(tokens)
        x = self.embed(tokens, out_sharding=rows)
        if self.positional != "none":
            if positions is None:
                start = self.position[...] if decode and self.position is not None else 0
                positions = start + jnp.arange(length)[None]
            if self.pos_embed is not None:
                positions = jnp.broadcast_to(positions, tokens.shape)
                x = x + self.pos_embed(positions, out_sharding=rows)
            else:
                table = jnp.asarray(_sinusoid(self.max_len, x.shape[-1]), x.dtype)
                x = x + table[positions]
        if decode and self.position is not None:
            self.position[...] += length
        x = self.dropout(x, deterministic=deterministic)
        mask = None
        if not decode:
            mask = nnx.make_causal_mask(tokens)
            valid = tokens > 0
            mask = nnx.combine_masks(mask, nnx.make_attention_mask(valid, valid))
            if segment_ids is not None:
                same = nnx.make_attention_mask(segment_ids, segment_ids, jnp.equal)
                mask = nnx.combine_masks(mask, same)
        for block in self.blocks:
            x = block(x, mask=mask, deterministic=deterministic, decode=decode)
        x = self.norm(x)
        if self.head is None:
            logits = self.embed.attend(x, out_sharding=rows)
        else:
            logits = self.head(x)
        return logits.astype(jnp.promote_types(jnp.float32, logits.dtype))
