from surgeflow.cli import app

app()
