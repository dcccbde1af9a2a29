import sys

from quantattn.bench.cli import main

sys.exit(main())
