"""Training package: archived studies and annotations in, versioned model packages out.

The node only reads the packages this package writes.
"""
