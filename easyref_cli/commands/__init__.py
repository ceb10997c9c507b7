"""One module per command body; ``cli.py`` only declares options and calls these."""
