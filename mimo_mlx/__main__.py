"""`python -m mimo_mlx` is the `mimo-mlx` command."""

from .cli.main import main

main()
