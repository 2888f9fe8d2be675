"""``python -m spark_parity`` as a script, for ``spark-submit`` (which runs files, not modules).

The bootstrap writes the same three lines to ``PREFIX/spark_parity_main.py`` on
every node; upload this copy to S3 for ``emr submit --venv-archive`` (the driver
then runs in a YARN container, which has only what is shipped to it).
"""

import sys

from spark_parity.cli import main

sys.exit(main())
