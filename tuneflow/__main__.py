import sys

from tuneflow.cli import main

sys.exit(main())
