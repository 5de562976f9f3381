"""fabric: the ML lifecycle as Ray workloads.

Importing this package is cheap: heavy dependencies (torch, ray, mlflow, ...) load only when a stage runs.
"""

from fabric._console import install as _install_console
from fabric.errors import ConfigError, DataValidationError, FabricError

__version__ = "0.1.0"

_install_console()

__all__ = ["ConfigError", "DataValidationError", "FabricError", "__version__"]
