"""The digits example (``make demo``): a small encoder trained with a remote loss next to the same loss in-process."""
