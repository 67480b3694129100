"""``python -m uspx`` (what ``torchrun -m uspx`` runs): the command line."""

from uspx.cli import main

main()
