"""`python -m lorag.cli`: the `lorag` command."""

from lorag.cli import main

main()
