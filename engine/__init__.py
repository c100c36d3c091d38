"""The top layer: executors, the commit point, the runner, the rounds loop and the CLI.
Nothing below imports it."""
