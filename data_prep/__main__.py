import sys

from data_prep.cli import main

if __name__ == "__main__":  # guard: --num-proc workers are spawned and re-import the main module
    sys.exit(main())
