import sys

from tfglm.cli import main

sys.exit(main())
