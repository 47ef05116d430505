"""``python -m llamba.distill ...`` = ``llamba distill ...``; what ``torchrun -m llamba.distill`` launches."""

import sys

from llamba.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
