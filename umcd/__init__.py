"""UMCD fleet: the settings object and the `umcd` command line shared by every part."""

__version__ = "0.1.0"
