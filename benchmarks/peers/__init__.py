"""The fruitdask job written on the engines a data engineer would try first.

``ray_job`` (Ray Data) and ``daft_job`` (Daft's native runner) each list the
images, run :func:`fruitdask.tables.extract_partition` (exactly the project's
decode + ORB kernel) per batch, flatten to one row per descriptor, fit the exact
PCA from moments (:mod:`fruitdask.pca`), project, and write the layout and
schemas of ``fruitdask run`` (``images/``, ``descriptors/``, ``features/``,
``model/``, ``manifest.json``, ``_SUCCESS`` last). ``benchmarks/compare.py
--engines dask,ray,daft`` runs them against the Dask job and checks parity.

Each module is a command::

    python -m benchmarks.peers.ray_job --input URL --output DIR [--cores N] [--json]
    python -m benchmarks.peers.daft_job --input URL --output DIR [--cores N] [--json]

Neither is installed with fruitdask: ``pip install -e ".[peers]"``.
"""
