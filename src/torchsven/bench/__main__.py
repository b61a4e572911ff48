"""``python -m torchsven.bench ARGS`` is ``torchsven bench ARGS``."""

import sys

from .cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
