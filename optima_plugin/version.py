"""The package version (a leaf module: :mod:`optima_plugin` re-exports it, :mod:`optima_plugin.files` stamps it)."""

__version__ = "0.1.0"
