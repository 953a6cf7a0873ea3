"""Global-batch training toolkit."""
