"""An example third-party mask selector for optima_plugin (registered by entry point)."""

from .plugin import Plugin, RowMagnitudeSelector, plugin

__all__ = ["Plugin", "RowMagnitudeSelector", "plugin"]
