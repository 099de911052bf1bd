"""``python -m ray_jobs.score ARGS`` is ``steel score ARGS`` (the entry point ``ray job submit`` runs)."""
import sys

from steel.cli import main

COMMAND = "score"

if __name__ == "__main__":
    sys.exit(main([COMMAND, *sys.argv[1:]]))
