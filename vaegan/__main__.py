"""`python -m vaegan COMMAND ...`, the same as the `vaegan` command (and `torchrun -m vaegan encode ...`)."""

from vaegan.cli import main

main()
