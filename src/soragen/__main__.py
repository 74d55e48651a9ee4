"""`python -m soragen`."""

from soragen.cli import main

main()
