"""bnfold's HTTP service: POST a model, get it folded, verified and served over KServe v2.

Importing this package is cheap; ``service.app.create_app(settings)`` builds the server.
"""

__version__ = "0.1.0"
