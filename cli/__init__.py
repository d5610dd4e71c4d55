"""The `oisa` command line (`oisa_cli.main:main`)."""
