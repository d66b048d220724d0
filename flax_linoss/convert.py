"""Convert weights between the linen and nnx skins.

Both skins use the same parameter names and shapes. The only differences are structural:
nnx keeps the blocks in a list (``blocks[3]``) where linen names them (``blocks_3``), and
nnx keeps batch-norm statistics on the module where linen has a ``"batch_stats"``
collection. The functions here map one onto the other exactly and check every leaf.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from flax_linoss.linen.bridge import linen_path as _linen_key

# linen collection name -> nnx variable type
_COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def nnx_to_linen(model: nnx.Module) -> dict[str, Any]:
    """Returns linen ``variables`` (``{"params": ..., "batch_stats": ...}``) for ``model``.

    Collections the model does not have are left out (no ``"batch_stats"`` without batch
    norm).
    """
    variables = {}
    for collection, var_type in _COLLECTIONS.items():
        flat = nnx.to_pure_dict(nnx.state(model, var_type))
        flat = traverse_util.flatten_dict(flat)
        if flat:
            variables[collection] = traverse_util.unflatten_dict(
                {_linen_key(k): v for k, v in flat.items()}
            )
    return variables


def linen_to_nnx(variables: dict[str, Any], model: nnx.Module) -> nnx.Module:
    """Loads linen ``variables`` into the matching nnx ``model`` (in place) and returns it.

    Raises:
      ValueError: naming every missing or unexpected entry, or a shape that differs.
    """
    unknown = set(variables) - set(_COLLECTIONS)
    if unknown:
        raise ValueError(
            f"Unknown linen collections {sorted(unknown)}; expected {sorted(_COLLECTIONS)}."
        )
    for collection, var_type in _COLLECTIONS.items():
        state = nnx.state(model, var_type)
        template = traverse_util.flatten_dict(nnx.to_pure_dict(state))
        source = traverse_util.flatten_dict(dict(variables.get(collection, {})))
        by_linen = {_linen_key(k): k for k in template}
        missing = sorted("/".join(k) for k in set(by_linen) - set(source))
        extra = sorted("/".join(k) for k in set(source) - set(by_linen))
        if missing or extra:
            raise ValueError(
                f"linen {collection!r} does not match the nnx model: missing {missing}, "
                f"unexpected {extra}."
            )
        new = {}
        for lkey, nkey in by_linen.items():
            value, want = source[lkey], template[nkey]
            if np.shape(value) != np.shape(want):
                raise ValueError(
                    f"{collection}/{'/'.join(lkey)} has shape {np.shape(value)} in linen but "
                    f"{np.shape(want)} in the nnx model."
                )
            new[nkey] = jax.numpy.asarray(value, dtype=jax.numpy.result_type(want))
        if template:
            nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(new))
            nnx.update(model, state)
    return model


def path_names(keypath) -> tuple[str, ...]:
    """A key path's names in the form both APIs share (see :func:`_canonical`), e.g.
    ``("params", "blocks_3", "ssm", "b")`` for linen and nnx alike."""
    return tuple(str(name) for _, name in _canonical(keypath))


def _canonical(keypath) -> tuple:
    """A key path in a form both APIs share: list items join their name (``blocks``, 3 ->
    ``blocks_3``) and the ``value`` attribute of nnx variables is dropped."""
    out: list[tuple[str, Any]] = []
    for i, k in enumerate(keypath):
        if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, int) and out:
            kind, name = out[-1]
            out[-1] = (kind, f"{name}_{k.key}")
        elif (
            isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value" and i == len(keypath) - 1
        ):
            continue
        elif isinstance(k, jax.tree_util.DictKey):
            out.append(("key", str(k.key)))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(("attr", k.name))
        else:
            out.append(("index", getattr(k, "idx", str(k))))
    return tuple(out)


def map_tree(tree: Any, template: Any, *, to_nnx: bool) -> Any:
    """``tree`` re-laid-out like ``template``, leaf by leaf through the shared path form.

    Works on variables and on anything holding variable-shaped trees (an optax state), in
    either direction: linen dicts (``blocks_3``) and ``nnx.State`` (``blocks/3``).

    Args:
      tree: the source tree (one API's form).
      template: the target structure (the other API's form; leaves may be abstract).
      to_nnx: direction, for the error message.

    Raises:
      ValueError: naming every missing or unexpected entry, or a shape that differs.
    """
    src = {_canonical(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    want = {_canonical(kp): leaf for kp, leaf in flat}
    missing = sorted("/".join(str(p[1]) for p in k) for k in set(want) - set(src))
    extra = sorted("/".join(str(p[1]) for p in k) for k in set(src) - set(want))
    if missing or extra:
        raise ValueError(
            f"Cannot convert to {'nnx' if to_nnx else 'linen'}: missing {missing}, "
            f"unexpected {extra}."
        )
    leaves = []
    for kp, leaf in flat:
        value = src[_canonical(kp)]
        if np.shape(value) != np.shape(leaf):
            raise ValueError(
                f"{'/'.join(str(p[1]) for p in _canonical(kp))} has shape {np.shape(value)} "
                f"but the target needs {np.shape(leaf)}."
            )
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves)
