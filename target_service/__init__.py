"""The target service: the large T5 scores a block of draft tokens in one forward pass."""
