"""A user's own model and data set for heterofl-edge (see README.md)."""
