import sys

from vdm.cli import main

sys.exit(main())
