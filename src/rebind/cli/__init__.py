"""The command line: thin parse, call, render."""
