"""Model code: silent (logs, never prints) and raising typed errors from ``easyref_cli.errors``."""
