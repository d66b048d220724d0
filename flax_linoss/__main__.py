"""``python -m flax_linoss``: the ``flax-linoss`` command line."""

from flax_linoss.cli import main

if __name__ == "__main__":
    main()
