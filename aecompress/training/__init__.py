"""Training autoencoders with Lightning: the module, the data module, callbacks and the CLI that runs them."""
