"""Entry points beside the CLI that serve a trained model: the HTTP service and its web page."""
