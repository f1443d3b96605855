"""Built-in strategies, one module each; every module here is imported when the registry loads.

Adding a strategy means adding a file here that decorates its class with `@tokenprune.register`.
"""
