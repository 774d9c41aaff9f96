import sys

from distseq.planner.cli import main

sys.exit(main())
