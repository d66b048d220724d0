"""The three models of the papers, defined once, with every name each one goes by.

=============  ===============  =============  ===============  ====================
scheme         paper label      mixer name     config name      mixer class
=============  ===============  =============  ===============  ====================
``im``         LinOSS-IM        ``linoss-im``    ``linoss_im``    ``LinOSSMixer``
``imex``       LinOSS-IMEX      ``linoss-imex``  ``linoss_imex``  ``LinOSSIMEXMixer``
``damped``     D-LinOSS         ``d-linoss``     ``d_linoss``     ``DLinOSSMixer``
=============  ===============  =============  ===============  ====================

The mixer name is the paper label in lower case and the config name is the mixer name with
``_`` for ``-``. ``dlinoss`` stays accepted as an alias of the config name ``d_linoss``.
No Flax or JAX here.
"""

from __future__ import annotations

import dataclasses

from flax_linoss.ops.schemes import DAMPED, IM, IMEX

__all__ = ["CONFIG_ALIASES", "VARIANTS", "Variant", "by_config_name", "by_scheme"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model of the papers.

    Attributes:
      scheme: the discretisation (``discretization=`` everywhere in the library).
      label: the papers' name.
      mixer_class: the class name of its sequence mixer (linen and nnx).
    """

    scheme: str
    label: str
    mixer_class: str

    @property
    def mixer(self) -> str:
        """The mixer registry name (``get_mixer``, ``config.model.mixer``)."""
        return self.label.lower()

    @property
    def config(self) -> str:
        """The config-string name (``configs/uea_scp1.py:<name>``)."""
        return self.mixer.replace("-", "_")


VARIANTS: tuple[Variant, ...] = (
    Variant(IM, "LinOSS-IM", "LinOSSMixer"),
    Variant(IMEX, "LinOSS-IMEX", "LinOSSIMEXMixer"),
    Variant(DAMPED, "D-LinOSS", "DLinOSSMixer"),
)

#: Older spellings of config names that keep working.
CONFIG_ALIASES = {"dlinoss": "d_linoss"}


def by_scheme(scheme: str) -> Variant:
    """The variant of a discretisation (``"im"``, ``"imex"``, ``"damped"``)."""
    for v in VARIANTS:
        if v.scheme == scheme:
            return v
    raise ValueError(
        f"Unknown discretization {scheme!r}; expected one of {[v.scheme for v in VARIANTS]}."
    )


def by_config_name(name: str) -> Variant:
    """The variant of a config-string name (``"linoss_im"``, ..., or an alias)."""
    name = CONFIG_ALIASES.get(name, name)
    for v in VARIANTS:
        if v.config == name:
            return v
    known = [v.config for v in VARIANTS] + list(CONFIG_ALIASES)
    raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(known)}.")
