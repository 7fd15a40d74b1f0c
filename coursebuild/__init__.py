"""How the course is built: run every notebook (run_all) and make the website (site).

Not part of the `helpers` package that students import, and not in its wheel: run it from the
repository root, e.g. `uv run python -m coursebuild.run_all --profile smoke`.
"""
