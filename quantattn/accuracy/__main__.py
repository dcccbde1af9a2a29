import sys

from quantattn.accuracy.cli import main

sys.exit(main())
