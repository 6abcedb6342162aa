"""``python -m ragtune <command> ...``: the ``ragtune`` console command."""

from ragtune.cli import main

main()
