"""``python -m ray_jobs.tune ARGS`` is ``steel tune ARGS`` (the entry point ``ray job submit`` runs)."""
import sys

from steel.cli import main

COMMAND = "tune"

if __name__ == "__main__":
    sys.exit(main([COMMAND, *sys.argv[1:]]))
