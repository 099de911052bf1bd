"""``python -m ray_jobs.serve ARGS`` is ``steel serve ARGS`` (the entry point ``ray job submit`` runs)."""
import sys

from steel.cli import main

COMMAND = "serve"

if __name__ == "__main__":
    sys.exit(main([COMMAND, *sys.argv[1:]]))
