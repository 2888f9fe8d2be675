"""fruitdask: distributed ORB featurization of image folders on object storage, with Dask."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
