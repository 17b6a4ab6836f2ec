from imagepipe.cli.app import run

run()
