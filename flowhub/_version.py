"""The version of flowhub (one place; the package and every module read it from here)."""

__version__ = "0.1.0"
