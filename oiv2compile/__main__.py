import sys

from oiv2compile.cli import main

if __name__ == "__main__":  # not in a child process that multiprocessing starts
    sys.exit(main())
