"""Greedy samplers for the Gemma-protocol decoders (nnx and linen), a tiny vocabulary.

As in flax's ``examples/gemma/sampler.py``: prompts are left-aligned in a token buffer,
one ``jax.jit``-ed ``lax.while_loop`` runs over a ``flax.struct`` state that threads the
cache dict, and each step feeds ONE token at its position with a cache-sized mask
``[B, 1, cache_size]`` (the valid steps so far, read off the token buffer); prompt tokens
are teacher-forced, then the argmax token is appended. The logits of every step are kept,
so a test can compare them with a full forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_style import transformer as transformer_lib


class TinyVocab:
    """A stand-in for a SentencePiece vocabulary: pad 0, eos 1, bos 2; text is encoded
    byte by byte onto the ids ``3 .. size - 1``."""

    def __init__(self, size: int):
        if size < 4:
            raise ValueError(f"a TinyVocab needs size >= 4, got {size}.")
        self.size = size

    def pad_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return 1

    def bos_id(self) -> int:
        return 2

    def EncodeAsIds(self, text: str) -> list[int]:
        return [3 + b % (self.size - 3) for b in text.encode()]

    def DecodeIds(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


@flax.struct.dataclass
class _SamplingState:
    decoding_step: jax.Array  # int32 []
    num_input_tokens: jax.Array  # int32 [B]
    token_buffer: jax.Array  # int32 [B, S + 1]
    positions: jax.Array  # int32 [B, S + 1]
    cache: Any  # the model's cache pytree
    done: jax.Array  # bool [B]
    logits_buffer: jax.Array  # [B, S + 1, V]; [:, t + 1] holds step t's logits
    total_sampling_steps: int = flax.struct.field(pytree_node=False)


@dataclasses.dataclass
class SamplerOutput:
    """Per prompt: ``tokens`` and ``logits [len(tokens), V]`` (from the prompt's end, or
    from step 0 with ``echo``; with echo, ``logits[0]`` is zeros: no step predicts the
    first token), ``text`` (the vocabulary's decoding), and ``num_steps`` (steps run)."""

    text: list[str]
    logits: list[np.ndarray]
    tokens: list[list[int]]
    num_steps: int


def on_mesh(x, batch_axis: str | None = None):
    """Puts ``x`` on the active mesh (if any), its leading (batch) axis split over
    ``batch_axis`` and the rest replicated, so it can meet sharded parameters in one
    program."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    spec = (batch_axis,) + (None,) * (x.ndim - 1) if x.ndim else ()
    return jax.device_put(x, jax.sharding.PartitionSpec(*spec))


def _step_mask(token_buffer, step, cache_size, pad_id):
    """``[B, 1, cache_size]``: the non-pad slots ``<= step`` (slot j holds step j)."""
    valid = (token_buffer != pad_id)[:, :cache_size]
    valid = jnp.pad(valid, ((0, 0), (0, cache_size - valid.shape[1])))
    return (valid & (jnp.arange(cache_size) <= step))[:, None, :]


def _sample_loop(apply: Callable, params, state: _SamplingState, cache_size, pad_id, eos_id):
    def body(s: _SamplingState) -> _SamplingState:
        t = s.decoding_step
        token = jax.lax.dynamic_slice_in_dim(s.token_buffer, t, 1, axis=1)
        position = jax.lax.dynamic_slice_in_dim(s.positions, t, 1, axis=1)
        mask = _step_mask(s.token_buffer, t, cache_size, pad_id)
        logits, cache = apply(params, token, position, s.cache, mask)
        logits = logits[:, -1]
        in_prompt = t < s.num_input_tokens - 1
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        next_token = jnp.where(in_prompt, s.token_buffer[:, t + 1], greedy)
        return s.replace(
            decoding_step=t + 1,
            token_buffer=s.token_buffer.at[:, t + 1].set(next_token),
            logits_buffer=s.logits_buffer.at[:, t + 1].set(logits.astype(s.logits_buffer.dtype)),
            cache=cache,
            done=s.done | (~in_prompt & (next_token == eos_id)),
        )

    def cond(s: _SamplingState):
        return (s.decoding_step < s.total_sampling_steps) & ~jnp.all(s.done)

    return jax.lax.while_loop(cond, body, state)


class _SamplerBase:
    """Prompt handling, state set-up and output; subclasses give the model calls."""

    def __init__(self, vocab, cache_size: int, num_embed: int, logits_sharding=None):
        self.vocab = vocab
        self.cache_size = cache_size
        self.num_embed = num_embed
        # The logits buffer [B, S, V] is laid out like the model's logits; the other
        # per-sequence buffers follow its batch axis.
        self.logits_sharding = logits_sharding
        self.batch_axis = None if logits_sharding is None else logits_sharding[0]

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        """A string becomes ``[bos] + ids``; a sequence of ids is taken as it is (it may
        hold pad ids, which are masked like padding)."""
        if isinstance(prompt, str):
            return [self.vocab.bos_id(), *self.vocab.EncodeAsIds(prompt)]
        return [int(i) for i in prompt]

    def _init_cache(self, batch_size: int, dtype) -> Any:
        raise NotImplementedError

    def _run(self, state: _SamplingState) -> _SamplingState:
        raise NotImplementedError

    def init_sample_state(
        self, prompts: Sequence[Sequence[int]], total_sampling_steps: int, dtype
    ) -> _SamplingState:
        batch = len(prompts)
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise ValueError("every prompt needs at least one token.")
        if total_sampling_steps > self.cache_size:
            raise ValueError(
                f"the longest prompt plus the generation steps ({total_sampling_steps}) "
                f"exceed cache_size ({self.cache_size})."
            )
        pad = self.vocab.pad_id()
        tokens = np.full((batch, total_sampling_steps + 1), pad, np.int32)
        input_mask = np.ones(tokens.shape, bool)  # generated steps count as valid
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            input_mask[i, : len(p)] = np.asarray(p) != pad
        return _SamplingState(
            decoding_step=on_mesh(jnp.zeros((), jnp.int32)),
            num_input_tokens=on_mesh(jnp.asarray(lengths, jnp.int32), self.batch_axis),
            token_buffer=on_mesh(jnp.asarray(tokens), self.batch_axis),
            positions=on_mesh(
                transformer_lib.build_positions_from_mask(jnp.asarray(input_mask)),
                self.batch_axis,
            ),
            cache=self._init_cache(batch, dtype),
            done=on_mesh(jnp.zeros((batch,), bool), self.batch_axis),
            logits_buffer=jnp.zeros(
                (batch, total_sampling_steps + 1, self.num_embed),
                jnp.float32,
                out_sharding=self.logits_sharding,
            ),
            total_sampling_steps=total_sampling_steps,
        )

    def __call__(
        self,
        input_strings: Sequence[str | Sequence[int]],
        total_generation_steps: int,
        echo: bool = False,
        dtype=jnp.float32,
    ) -> SamplerOutput:
        """Greedy completion of each prompt (a string or a list of token ids).

        ``total_generation_steps`` counts from the longest prompt's end (as in gemma);
        shorter prompts generate correspondingly more tokens.
        """
        prompts = [self.tokenize(p) for p in input_strings]
        total = max(len(p) for p in prompts) + total_generation_steps
        state = self._run(self.init_sample_state(prompts, total, dtype))
        tokens = np.asarray(state.token_buffer)
        logits = np.asarray(state.logits_buffer)
        out_tokens, out_logits = [], []
        for i, p in enumerate(prompts):
            start = 0 if echo else len(p)
            out_tokens.append(tokens[i, start:total].tolist())
            out_logits.append(logits[i, start:total])
        return SamplerOutput(
            text=[self.vocab.DecodeIds(t) for t in out_tokens],
            logits=out_logits,
            tokens=out_tokens,
            num_steps=int(state.decoding_step),
        )


class Sampler(_SamplerBase):
    """Samples from an nnx ``Transformer``: the model is split into graphdef + state and the
    state is an argument of the jitted loop (so it is not baked into the program)."""

    def __init__(self, *, transformer: transformer_lib.Transformer, vocab, cache_size: int = 64):
        super().__init__(vocab, cache_size, transformer.num_embed, transformer.shd_config.act_btd)
        self.transformer = transformer

        def loop(graphdef, params, state):
            def apply(params, tokens, positions, cache, mask):
                return nnx.merge(graphdef, params)(tokens, positions, cache, mask)

            return _sample_loop(apply, params, state, cache_size, vocab.pad_id(), vocab.eos_id())

        # One compiled program per Sampler (as gemma's); graphdef is static.
        self._compiled = jax.jit(loop, static_argnums=0)

    def _init_cache(self, batch_size, dtype):
        return self.transformer.init_cache(self.cache_size, batch_size, dtype)

    def _run(self, state):
        graphdef, params = nnx.split(self.transformer)
        return self._compiled(graphdef, params, state)


class LinenSampler(_SamplerBase):
    """The same loop for the linen ``Transformer`` (``model.apply`` each step; the cache
    comes from ``model.init_cache`` through ``apply(..., method=...)``)."""

    def __init__(self, *, model, params, vocab, cache_size: int = 64):
        super().__init__(vocab, cache_size, model.config.num_embed)
        self.model, self.params = model, params

        def loop(params, state):
            return _sample_loop(
                model.apply, params, state, cache_size, vocab.pad_id(), vocab.eos_id()
            )

        self._compiled = jax.jit(loop)

    def _init_cache(self, batch_size, dtype):
        return self.model.apply(
            self.params, self.cache_size, batch_size, dtype, method=type(self.model).init_cache
        )

    def _run(self, state):
        return self._compiled(self.params, state)
