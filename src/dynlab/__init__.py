"""dynlab: a platform for efficient and dynamic neural networks."""

__version__ = "0.1.0"
