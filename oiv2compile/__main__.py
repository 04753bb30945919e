import sys

from oiv2compile.cli import main

sys.exit(main())
