"""The built-in recipes (YAML data). Installed as ``tome_export.recipes``; read through :mod:`tome_export.recipe`."""
