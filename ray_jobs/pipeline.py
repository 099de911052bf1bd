"""``python -m ray_jobs.pipeline ARGS`` is ``steel run ARGS`` (the entry point ``ray job submit`` runs)."""
import sys

from steel.cli import main

COMMAND = "run"

if __name__ == "__main__":
    sys.exit(main([COMMAND, *sys.argv[1:]]))
