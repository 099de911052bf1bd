"""``python -m ray_jobs.train ARGS`` is ``steel train ARGS`` (the entry point ``ray job submit`` runs)."""
import sys

from steel.cli import main

COMMAND = "train"

if __name__ == "__main__":
    sys.exit(main([COMMAND, *sys.argv[1:]]))
