"""`python -m pes`: the same command line as the `pes` console script."""

from pes.cli import main

main()
