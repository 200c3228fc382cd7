from relex_cli.app import run

run()
