import sys

from llamba.cli import main

sys.exit(main())
