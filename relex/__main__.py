import sys

from relex_cli.app import main

sys.exit(main())
