"""``python -m aecompress`` runs the same entry point as the ``aecompress`` script."""

from aecompress.cli import main

main()
