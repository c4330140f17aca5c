import sys

from hpcml.localcluster.cluster import main

sys.exit(main())
