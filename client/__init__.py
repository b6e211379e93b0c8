"""fedrec client side: ClientApp, local data, the DP lifecycle, DP training and evaluation."""
