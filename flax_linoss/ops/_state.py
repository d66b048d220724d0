"""The recurrent state carried between calls (streaming, decoding)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class LinOSSState(NamedTuple):
    """Oscillator state, real and imaginary parts stacked on axis ``-2``.

    Attributes:
      z: ``[..., 2, P]`` velocities (``z[..., 0, :]`` real part, ``z[..., 1, :]`` imaginary).
      y: ``[..., 2, P]`` positions, same layout.
    """

    z: jnp.ndarray
    y: jnp.ndarray

    @classmethod
    def zeros(cls, batch_shape, num_oscillators: int, dtype=jnp.float32) -> LinOSSState:
        """A zero state for a batch of shape ``batch_shape``."""
        shape = (*tuple(batch_shape), 2, num_oscillators)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @classmethod
    def from_complex(cls, z: jnp.ndarray, y: jnp.ndarray) -> LinOSSState:
        """Builds a state from complex ``[..., P]`` velocities and positions."""
        return cls(
            jnp.stack([jnp.real(z), jnp.imag(z)], -2), jnp.stack([jnp.real(y), jnp.imag(y)], -2)
        )

    def to_complex(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Returns complex ``(z, y)``, each ``[..., P]``."""
        return (
            self.z[..., 0, :] + 1j * self.z[..., 1, :],
            self.y[..., 0, :] + 1j * self.y[..., 1, :],
        )
