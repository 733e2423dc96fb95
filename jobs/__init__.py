"""`python -m jobs.<name>` entrypoints for `ray job submit`."""
