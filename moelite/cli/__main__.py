import sys

from moelite.cli import main

sys.exit(main())
