"""Adapters: how a codebase's own attention class maps onto a sequence mixer.

A codebase that defines its own attention (flax's ``examples/gemma``, Google DeepMind's
``gemma``, MaxText, ...) constructs and calls it its own way. An adapter is a small class
written against that protocol: its ``__init__`` (nnx) or fields (linen) take the attention's
constructor arguments, its ``__call__`` takes the attention's call arguments and returns
what the attention returns, and it forwards to the mixer with two helpers:

* nnx (:class:`NnxAdapter`): ``self.init_mixer(**mixer_kwargs)`` builds the mixer's
  parameters on this very module (no extra nesting: the parameters sit where the
  attention's did), ``self.mix(x, ...)`` runs the mixer's call (``state=`` for decoding).
* linen (:class:`LinenAdapter`): the adapter's fields are copied from the attention class it
  replaces; ``self.mixer_kwargs()`` maps them onto the linen mixer's fields and, inside
  ``@nn.compact``, ``self.mixer()`` is the mixer, sharing this module's scope.

:func:`flax_linoss.swap_attention` combines an adapter with a mixer class (a registered
name or your class): ``type(name, (Adapter, MixerClass), ...)``. Register adapters by name
with :func:`register_adapter`; ``"gemma"`` ships (:mod:`flax_linoss.zoo.gemma`).

A complete adapter for a codebase whose attention is ``Attn(dim, heads, *, rngs)`` called
as ``attn(x, mask, cache) -> (out, cache)``::

    @flax_linoss.register_adapter("mycode", api="nnx")
    class MyCode(flax_linoss.NnxAdapter):
        def __init__(self, dim, heads, *, rngs):
            self.init_mixer(num_heads=heads, in_features=dim, rngs=rngs)

        def __call__(self, x, mask, cache):
            if cache is None:
                return self.mix(x, mask=mask), None
            return self.mix(x, mask=mask, state=cache)  # (out, new_state)

        def init_cache(self, batch_size):
            return self.init_state((batch_size,))
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn

from flax_linoss.mixers.registry import LINEN, NNX, ApiRegistry

__all__ = [
    "LinenAdapter",
    "NnxAdapter",
    "adapted_class",
    "available_adapters",
    "get_adapter",
    "register_adapter",
]

# (api, name) -> adapter class, or "module:attribute" for a lazy import.
_ADAPTERS = ApiRegistry(
    "adapter",
    {
        (NNX, "gemma"): "flax_linoss.zoo.gemma:GemmaNnx",
        (LINEN, "gemma"): "flax_linoss.zoo.gemma:GemmaLinen",
    },
    hint="register yours with flax_linoss.register_adapter(name, cls, api=...)",
)


def register_adapter(name: str, adapter: type | None = None, *, api: str, overwrite=False):
    """Registers ``adapter`` (a :class:`NnxAdapter` or :class:`LinenAdapter` subclass) as
    ``name`` for ``api``; usable as a decorator. Returns the class."""

    def check(cls):
        base = NnxAdapter if api == NNX else LinenAdapter
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(
                f"An {api} adapter must be a subclass of flax_linoss.{base.__name__}, got {cls!r}."
            )

    def register(cls):
        _ADAPTERS.register(name, cls, api, overwrite, check)
        return cls

    return register if adapter is None else register(adapter)


def get_adapter(name: str, api: str) -> type:
    """The adapter class registered as ``name`` for ``api``."""
    return _ADAPTERS.get(name, api)


def available_adapters(api: str) -> list[str]:
    """Sorted names of the adapters registered for ``api``."""
    return _ADAPTERS.names(api)


class NnxAdapter:
    """Base of nnx adapters (mix into an nnx mixer class by :func:`adapted_class`).

    Subclasses define ``__init__`` with the target attention's constructor signature (call
    :meth:`init_mixer` there), ``__call__`` with its call signature (use :meth:`mix`), and
    whatever else the codebase calls on its attention (``init_cache``, ...). Every method of
    the mixer (``init_state``, ...) is available on ``self``.
    """

    _mixer_class: ClassVar[type]
    _mixer_options: ClassVar[dict[str, Any]] = {}

    def init_mixer(self, **kwargs: Any) -> None:
        """Builds the mixer on this module: its constructor with ``kwargs`` (the swap's
        ``options`` take precedence)."""
        self._mixer_class.__init__(self, **{**kwargs, **self._mixer_options})

    def mix(self, *args: Any, **kwargs: Any) -> Any:
        """The mixer's own call (see :class:`flax_linoss.mixers.nnx.LinOSSMixer`)."""
        return self._mixer_class.__call__(self, *args, **kwargs)


class LinenAdapter(nn.Module):
    """Base of linen adapters. The generated class's fields are the target attention's
    (copied from its dataclass fields); subclasses define :meth:`mixer_kwargs` (the linen
    mixer's fields from them) and ``__call__`` (``@nn.compact``, with the target's call
    signature) using :meth:`mixer`, plus any class or instance method the codebase calls on
    its attention (``init_cache``)."""

    _mixer_class: ClassVar[type]
    _mixer_options: ClassVar[dict[str, Any]] = {}

    def mixer_kwargs(self) -> dict[str, Any]:
        """The linen mixer's fields, from this module's (the target attention's) fields."""
        raise NotImplementedError

    @classmethod
    def mixer_from(cls, **kwargs: Any):
        """An unbound mixer with these fields (the swap's ``options`` take precedence), e.g.
        for a class method that needs its sizes."""
        return cls._mixer_class(**{**kwargs, **cls._mixer_options}, parent=None)

    def mixer(self):
        """The mixer, sharing this module's scope (its parameters sit where the attention's
        did). Call inside ``@nn.compact``."""
        module = self._mixer_class(**{**self.mixer_kwargs(), **self._mixer_options})
        nn.share_scope(self, module)
        return module


def adapted_class(adapter: type, mixer: type, *, target: type, options: dict[str, Any]) -> type:
    """The module class that replaces ``target``: ``adapter``'s protocol over ``mixer``."""
    namespace: dict[str, Any] = {
        "_mixer_class": mixer,
        "_mixer_options": dict(options),
        "__module__": adapter.__module__,
        "__doc__": (
            f"{mixer.__name__} through the {adapter.__name__} adapter, standing in for "
            f"{target.__module__}.{target.__qualname__}.\n\n{adapter.__doc__ or ''}"
        ),
    }
    if issubclass(adapter, NnxAdapter):
        return type(mixer.__name__, (adapter, mixer), namespace)
    # linen: the target's fields, so the codebase constructs it exactly as its attention.
    annotations = {}
    for f in dataclasses.fields(target):
        if f.name in ("parent", "name") or not f.init:
            continue
        annotations[f.name] = f.type
        if f.default is not dataclasses.MISSING:
            namespace[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f.name] = dataclasses.field(default_factory=f.default_factory)
    namespace["__annotations__"] = annotations
    return type(mixer.__name__, (adapter,), namespace)
