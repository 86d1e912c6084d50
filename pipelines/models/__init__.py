"""Network architectures of the pipelines and the model package format.

Importing this package registers the built-in architectures with
``pipelines.models.package``; add one import line per architecture module.
"""
