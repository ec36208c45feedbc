"""`python -m mimo_mlx` is the `mimo-mlx` command."""

from .cli import main

main()
