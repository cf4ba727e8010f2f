from tfglm.cli import run

run()
