"""The block-by-block loop and what feeds it."""
