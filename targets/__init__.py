"""Deployment target files (data, not code): ``edgelora.target.load_target(NAME)`` reads them."""
