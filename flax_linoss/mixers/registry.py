"""Mixer registry (a config string picks the sequence mixer) and an attention swap helper.

Pre-registered, for ``api="linen"`` and ``api="nnx"``:

=================  =========================================  ==============================
name               linen                                      nnx
=================  =========================================  ==============================
``attention``      ``flax.linen.MultiHeadDotProductAttention``  ``flax.nnx.MultiHeadAttention``
``linoss-im``      :class:`~flax_linoss.mixers.linen.LinOSSMixer`       ``...nnx.LinOSSMixer``
``linoss-imex``    :class:`~flax_linoss.mixers.linen.LinOSSIMEXMixer`   ``...nnx.LinOSSIMEXMixer``
``d-linoss``       :class:`~flax_linoss.mixers.linen.DLinOSSMixer`      ``...nnx.DLinOSSMixer``
=================  =========================================  ==============================

A registered factory is called exactly like the attention class it stands in for (linen:
``nn.MultiHeadDotProductAttention``'s keyword arguments, then its call; nnx:
``nnx.MultiHeadAttention(num_heads, in_features, ..., rngs=...)``). Built-ins are imported
lazily, so importing this module does not import Flax.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any

from flax_linoss.variants import VARIANTS

LINEN = "linen"
NNX = "nnx"
APIS = (LINEN, NNX)

# (api, name) -> factory, or "module:attribute" for a lazy import. The LinOSS entries come
# from the one definition of the three models (flax_linoss.variants).
_REGISTRY: dict[tuple[str, str], Any] = {
    (LINEN, "attention"): "flax.linen:MultiHeadDotProductAttention",
    (NNX, "attention"): "flax.nnx:MultiHeadAttention",
    **{
        (api, v.mixer): f"flax_linoss.mixers.{api}:{v.mixer_class}"
        for api in (LINEN, NNX)
        for v in VARIANTS
    },
}
_LOCK = threading.Lock()


def _check_api(api: str) -> str:
    if api not in APIS:
        raise ValueError(f"Unknown api {api!r}; expected one of {list(APIS)}.")
    return api


def _resolve(entry: Any) -> Any:
    if isinstance(entry, str):
        module, attr = entry.split(":")
        return getattr(importlib.import_module(module), attr)
    return entry


def register_mixer(
    name: str, factory: Callable | None = None, *, api: str = LINEN, overwrite: bool = False
):
    """Registers ``factory`` as mixer ``name`` for ``api`` (``"linen"`` or ``"nnx"``).

    Usable as a decorator: ``@register_mixer("mine", api="nnx")``.

    Args:
      name: the config string.
      factory: a class or callable with the constructor signature of the attention it
        replaces (see the module doc); a class is needed to swap it into ``SelfAttention``.
      api: which Flax API the factory is for.
      overwrite: replace an existing entry instead of raising.

    Returns:
      ``factory`` (or a decorator when ``factory`` is omitted).
    """
    _check_api(api)
    if not isinstance(name, str) or not name:
        raise ValueError(f"A mixer name must be a non-empty string, got {name!r}.")

    def register(fn):
        if not callable(fn):
            raise TypeError(f"Mixer factory for {name!r} must be callable, got {fn!r}.")
        with _LOCK:
            if (api, name) in _REGISTRY and not overwrite:
                raise ValueError(
                    f"Mixer {name!r} is already registered for api={api!r}; pass "
                    "overwrite=True to replace it."
                )
            _REGISTRY[(api, name)] = fn
        return fn

    return register if factory is None else register(factory)


def get_mixer(name: str, api: str = LINEN) -> Any:
    """The factory registered as ``name`` for ``api``.

    Raises:
      KeyError: naming the available mixers.
    """
    _check_api(api)
    try:
        entry = _REGISTRY[(api, name)]
    except KeyError:
        raise KeyError(
            f"No mixer {name!r} for api={api!r}; available: {available_mixers(api)}."
        ) from None
    return _resolve(entry)


def available_mixers(api: str = LINEN) -> list[str]:
    """Sorted names of the mixers registered for ``api``."""
    _check_api(api)
    return sorted(name for (a, name) in _REGISTRY if a == api)


# ----------------------------------------------------------------------------------------
# Swapping the attention class of existing code.

# The attributes through which Flax code reaches its attention classes.
_LINEN_TARGETS = ("MultiHeadDotProductAttention", "MultiHeadAttention", "SelfAttention")
_NNX_TARGETS = ("MultiHeadAttention",)


def _replacement(mixer: Any, attr: str, api: str) -> Any:
    if api == LINEN and attr == "SelfAttention":
        from flax_linoss.mixers.linen import as_self_attention

        return as_self_attention(mixer)
    return mixer


@contextlib.contextmanager
def swap_attention(
    mixer: str | Callable,
    *,
    api: str = LINEN,
    namespaces: Iterable[ModuleType | Any] = (),
) -> Iterator[Any]:
    """Temporarily replaces Flax's self-attention classes with ``mixer``.

    Inside the ``with`` block, ``flax.linen.MultiHeadDotProductAttention``,
    ``MultiHeadAttention`` and ``SelfAttention`` (api ``"linen"``) or
    ``flax.nnx.MultiHeadAttention`` (api ``"nnx"``) name the mixer, in ``flax.linen`` /
    ``flax.nnx`` and in the modules that define them, and in each of ``namespaces`` (modules
    or objects whose attributes of those names are the original classes, e.g. a model file
    that did ``from flax.linen import SelfAttention``). ``SelfAttention`` gets a subclass of
    the mixer with ``SelfAttention``'s call signature (mask as second positional argument).

    Example::

        with swap_attention("linoss-im"):
            variables = model.init(key, tokens)          # linen: init AND apply inside
            logits = model.apply(variables, tokens)

        with swap_attention("d-linoss", api="nnx"):
            model = MyNnxTransformer(..., rngs=nnx.Rngs(0))  # nnx: construction inside

    Limits (read these):
      * It patches module attributes, so it only reaches code that looks the class up
        *when the block runs*: ``nn.SelfAttention(...)`` inside a linen ``__call__`` or an
        nnx ``__init__``. Names bound earlier are missed: a default argument
        (``attn_cls=nn.MultiHeadDotProductAttention``), a dataclass field default, a
        subclass (``class MyAttn(nn.MultiHeadDotProductAttention)``), ``from flax.linen
        import X`` in a module you did not list in ``namespaces``.
      * linen rebuilds submodules on every ``init``/``apply``, so every ``init``, ``apply``
        and the first call (trace) of every ``jax.jit``-ed function must run inside the
        block; a function traced inside and called outside keeps the mixer only until it
        is re-traced. nnx modules keep the mixer instances they were built with, so only
        construction needs the block.
      * It is process-global and not thread-safe against other threads using Flax
        attention at the same time. The patch is undone on exit, also on error; nesting
        works (inner block wins).
      * It replaces *self*-attention only in spirit: code that calls the swapped class for
        cross-attention (different keys/values) gets the mixer's clear ``ValueError``.
      * Parameter trees differ from attention's (the mixer's own names, under the auto
        name of the mixer class, e.g. ``LinOSSMixer_0``), so attention checkpoints do not
        load.

    For new code prefer a config value: ``get_mixer(config.mixer)(...)``.

    Args:
      mixer: a registered name (:func:`available_mixers`) or a mixer class.
      api: ``"linen"`` or ``"nnx"``.
      namespaces: extra modules/objects to patch (only attributes that currently hold one
        of the original classes are touched).

    Yields:
      The mixer class.
    """
    _check_api(api)
    cls = get_mixer(mixer, api) if isinstance(mixer, str) else mixer
    if api == LINEN:
        import flax.linen
        import flax.linen.attention

        targets = _LINEN_TARGETS
        originals = {a: getattr(flax.linen.attention, a) for a in targets}
        homes = [flax.linen, flax.linen.attention]
    else:
        import flax.nnx
        import flax.nnx.nn.attention

        targets = _NNX_TARGETS
        originals = {a: getattr(flax.nnx.nn.attention, a) for a in targets}
        homes = [flax.nnx, flax.nnx.nn.attention]
    replacements = {a: _replacement(cls, a, api) for a in targets}
    by_original = {id(orig): replacements[a] for a, orig in originals.items()}
    patched: list[tuple[Any, str, Any]] = []
    with _LOCK:
        try:
            for home in homes:
                for attr in targets:
                    if hasattr(home, attr):
                        patched.append((home, attr, getattr(home, attr)))
                        setattr(home, attr, replacements[attr])
            for space in namespaces:
                for attr in dir(space):
                    value = getattr(space, attr, None)
                    if id(value) in by_original:
                        patched.append((space, attr, value))
                        setattr(space, attr, by_original[id(value)])
        except BaseException:
            _undo(patched)
            raise
    try:
        yield cls
    finally:
        with _LOCK:
            _undo(patched)


def _undo(patched: list[tuple[Any, str, Any]]) -> None:
    for obj, attr, value in reversed(patched):
        setattr(obj, attr, value)
