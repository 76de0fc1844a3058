"""embtrain server: a remote loss-and-mining service for training embedding models over gRPC."""

__version__ = "0.1.0"
