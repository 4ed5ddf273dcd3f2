"""``python -m heterofl_edge`` runs the command line."""

from heterofl_edge.cli import main

main()
