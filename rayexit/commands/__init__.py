"""One module per `rayexit` command."""
