import sys

from coun_tune.cli import main

sys.exit(main())
