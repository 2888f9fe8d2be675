import sys

from spark_parity.cli import main

if __name__ == "__main__":
    sys.exit(main())
