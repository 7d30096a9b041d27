from polytrain.cli import entry

entry()
