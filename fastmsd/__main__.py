import sys

from fastmsd.cli import main

# The guard matters: synthcxr generation spawns worker processes that re-import __main__.
if __name__ == "__main__":
    sys.exit(main())
