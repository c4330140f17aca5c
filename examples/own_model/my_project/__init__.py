"""A research project of its own, trained by hpcml with no change to hpcml (see ../README.md)."""
