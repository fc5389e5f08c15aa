"""Where the native layer's modules find os_error until they import it from migrate.errors."""
from migrate.errors import os_error

__all__ = ["os_error"]
