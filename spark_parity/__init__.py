"""spark_parity: the fruitdask job in PySpark, for parity checks and benchmarks.

``python -m spark_parity run --input URL --output URL`` runs the job of
``fruitdask run`` on Spark with the same kernels (:mod:`fruitdask.features`),
output layout, schemas and commit; only the manifest's ``engine`` differs.
pyspark (``pip install fruitdask[spark]``) and Java 17+ are needed at run time,
not at import.
"""

from __future__ import annotations

from spark_parity.job import PROFILES, preflight, run
from spark_parity.session import SparkSpec, SparkUnavailable, start

__all__ = ["PROFILES", "SparkSpec", "SparkUnavailable", "preflight", "run", "start"]
