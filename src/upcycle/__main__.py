import sys

from upcycle.cli import main

sys.exit(main())
