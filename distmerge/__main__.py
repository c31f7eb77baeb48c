from distmerge.app.cli import entry

entry()
