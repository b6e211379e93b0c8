"""fedrec client side: ClientApp, local data, DP training and evaluation."""
