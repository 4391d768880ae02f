"""mplib: the splitting, pipelining and transfer logic that the course notebooks call."""

__version__ = "0.1.0"
